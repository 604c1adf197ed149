// The replicated gradients averaged over the ranks in buckets while the backward goes on: as soon as
// the backward has finished a forward block's gradients (a layer's, the LM head's, the embedding's),
// its bucket is all-reduced on a stream of its own, so that only the last buckets' all-reduce is
// left when the backward ends. The buckets use an NCCL communicator of their own: NCCL runs one
// communicator's operations in the order they were issued, and the main stream's exchanges and
// these all-reduces, issued from two streams, could meet in different orders on different ranks.
#pragma once
#include <utility>
#include <vector>

#include "parallel/comm.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

using Runs = std::vector<std::pair<int64_t, int64_t>>;  // (offset, count) runs of a flat buffer

class GradientBuckets {
  public:
    // buckets[j]: the runs of bucket j. Collective on several ranks; nothing at all on one.
    GradientBuckets(const Comm& comm, std::vector<Runs> buckets) : buckets_(std::move(buckets)) {
        if (comm.single()) return;
        NCCL_CHECK(ncclCommSplit(comm.nccl, 0, comm.rank, &comm_, nullptr));
        int least = 0, greatest = 0;
        CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
        CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamDefault, greatest));
        ready_.resize(buckets_.size());
        for (cudaEvent_t& e : ready_) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    }
    ~GradientBuckets() {
        if (!comm_) return;
        cudaStreamSynchronize(stream_);
        for (cudaEvent_t e : ready_) cudaEventDestroy(e);
        cudaEventDestroy(done_);
        cudaStreamDestroy(stream_);
        ncclCommDestroy(comm_);
    }
    GradientBuckets(const GradientBuckets&) = delete;
    GradientBuckets& operator=(const GradientBuckets&) = delete;

    // Bucket j of `grads` is final once `main`'s queued work has run: average it over the ranks, in
    // place, behind that work.
    void reduce(int j, float* grads, cudaStream_t main) {
        if (!comm_) return;
        CUDA_CHECK(cudaEventRecord(ready_[j], main));
        CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_[j]));
        NCCL_CHECK(ncclGroupStart());
        for (const auto& [offset, count] : buckets_[j])
            NCCL_CHECK(ncclAllReduce(grads + offset, grads + offset, count, ncclFloat, ncclAvg, comm_, stream_));
        NCCL_CHECK(ncclGroupEnd());
    }
    // `main` waits for every bucket reduced so far.
    void wait(cudaStream_t main) {
        if (!comm_) return;
        CUDA_CHECK(cudaEventRecord(done_, stream_));
        CUDA_CHECK(cudaStreamWaitEvent(main, done_));
    }

  private:
    std::vector<Runs> buckets_;
    ncclComm_t comm_ = nullptr;  // null on one rank
    cudaStream_t stream_ = nullptr;
    std::vector<cudaEvent_t> ready_;
    cudaEvent_t done_ = nullptr;
};

}  // namespace lmoe
