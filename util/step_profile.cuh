// Where a training step's time goes, measured with CUDA events on the training stream (SPEC §3's
// per-step breakdown): attention blocks, FFN layers, the all-to-alls inside them, the gradient
// all-reduce and the optimizer. Sections may nest (the all-to-alls sit inside the FFN); events are
// read once per step, after the step's final synchronisation, so profiling adds no host sync.
#pragma once
#include <string>
#include <vector>

#include "util/cuda_utils.cuh"

namespace lmoe {

enum class Section { Attention, Ffn, AllToAll, AllReduce, Optimizer, Count };

class StepProfile {
  public:
    explicit StepProfile(cudaStream_t stream) : stream_(stream) {}
    ~StepProfile() {
        for (cudaEvent_t e : pool_) cudaEventDestroy(e);
    }
    StepProfile(const StepProfile&) = delete;
    StepProfile& operator=(const StepProfile&) = delete;

    void begin(Section s) { open_.push_back({s, record(), nullptr}); }
    void end(Section s) {
        for (auto it = open_.rbegin(); it != open_.rend(); ++it)
            if (it->section == s && !it->stop) {
                it->stop = record();
                return;
            }
    }

    // Milliseconds per section since the last call (the stream must have been synchronised).
    std::vector<double> take() {
        std::vector<double> ms((int)Section::Count, 0.0);
        for (const Span& sp : open_) {
            float t = 0.f;
            if (sp.stop) CUDA_CHECK(cudaEventElapsedTime(&t, sp.start, sp.stop));
            ms[(int)sp.section] += t;
        }
        open_.clear();
        used_ = 0;
        return ms;
    }

  private:
    struct Span {
        Section section;
        cudaEvent_t start, stop;
    };
    cudaStream_t stream_;
    std::vector<cudaEvent_t> pool_;  // events are reused step after step
    size_t used_ = 0;
    std::vector<Span> open_;

    cudaEvent_t record() {
        if (used_ == pool_.size()) {
            cudaEvent_t e;
            CUDA_CHECK(cudaEventCreate(&e));
            pool_.push_back(e);
        }
        cudaEvent_t e = pool_[used_++];
        CUDA_CHECK(cudaEventRecord(e, stream_));
        return e;
    }
};

// Begins a section on construction and ends it on destruction; does nothing without a profile.
class ProfileScope {
  public:
    ProfileScope(StepProfile* p, Section s) : p_(p), s_(s) {
        if (p_) p_->begin(s_);
    }
    ~ProfileScope() {
        if (p_) p_->end(s_);
    }

  private:
    StepProfile* p_;
    Section s_;
};

}  // namespace lmoe
