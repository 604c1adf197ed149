// Weight gradients over uneven groups. An expert's weight gradient is a sum over the copies routed
// to it; with one block per (expert, output tile) a skewed routing leaves the GPU idle while a few
// blocks walk the crowded experts (at the start of training every token may pick the same k
// experts: then k of E experts hold all the copies). So the copies of each group are cut into
// segments of at most `rows` copies, one block per (output tile, segment):
//   segment 0 of a group adds its sum into the gradient, as an unsplit block would;
//   segment i > 0 stores its sum in a partial slot, and reduce_partials adds the slots into the
//   gradient in segment order afterwards.
// Every sum keeps a fixed order, so results stay bitwise reproducible; they differ from unsplit
// sums only by association. The segment length follows the number of copies M (known on the host,
// the group sizes are not): rows = M · tiles / target_blocks, at least kMinSegmentRows, so a
// balanced routing is rarely split, at most target_blocks / tiles slots are ever needed, and the
// plan is built on the device without a host synchronisation.
#pragma once
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "cuda_utils.cuh"

namespace lmoe {

constexpr int kMinSegmentRows = 64;     // a multiple of every weight kernel's step through the copies
constexpr int kSegmentPlanThreads = 1024;
constexpr int kMaxSegmentGroups = 4 * kSegmentPlanThreads;

// The segments of one call, as the kernels see them (device pointers).
struct GradSegments {
    const int* group_offset;  // (G + 1) the grouping's offsets
    int* seg_group;           // (max_segments) group of each segment, groups in order
    int* seg_begin;           // (max_segments) its first copy
    int* seg_slot;            // (max_segments) -1: adds into the gradient; else its partial slot
    int* num_segments;        // (1)
    int* split_group;         // (max_slots) groups with partial slots, and where their slots start
    int* split_first_slot;    //
    int* split_slots;         //
    int* num_split;           // (1)
    int rows;                 // segment length in copies
    float* partials;          // (max_slots, tensors, group_elems)
    int tensors;              // gradients one kernel writes (dK and dV: 2)
    int64_t group_elems;      // one group's elements of one gradient
};

// One block's share of the sum: copies [begin, end) of group g; g < 0 for blocks past the segments
// in use. A group's first segment (slot < 0) adds its sum into the gradient; the others store theirs.
struct Segment {
    int g, begin, end, slot;
    __device__ bool accumulates() const { return slot < 0; }
};

__device__ inline Segment segment_at(const GradSegments& s, int i) {
    if (i >= *s.num_segments) return {-1, 0, 0, -1};
    const int g = s.seg_group[i], begin = s.seg_begin[i];
    return {g, begin, min(begin + s.rows, s.group_offset[g + 1]), s.seg_slot[i]};
}

// Where segment `seg` puts its sum for gradient `tensor` (grad: that tensor's (G, group_elems)):
// the group's gradient, or its partial slot.
__device__ inline float* segment_output(const GradSegments& s, const Segment& seg, float* grad, int tensor) {
    if (seg.accumulates()) return grad + seg.g * s.group_elems;
    return s.partials + ((int64_t)seg.slot * s.tensors + tensor) * s.group_elems;
}

// Writes two adjacent elements (8-byte aligned) of a segment's sum: added into the gradient or stored.
__device__ inline void store_pair(float* out, float v0, float v1, bool accumulate) {
    float2* at = reinterpret_cast<float2*>(out);
    if (accumulate) {
        const float2 old = *at;
        v0 += old.x;
        v1 += old.y;
    }
    *at = make_float2(v0, v1);
}

// Builds the segment list from the group offsets: a group of n copies gets ceil(n / rows) segments
// (an empty group none), the first adding into the gradient, the others numbered slots. One block;
// thread i plans groups [4i, 4i + 4).
__global__ void __launch_bounds__(kSegmentPlanThreads) plan_segments_kernel(GradSegments s, int G) {
    using Scan = cub::BlockScan<int, kSegmentPlanThreads>;
    __shared__ typename Scan::TempStorage scratch;
    constexpr int per_thread = kMaxSegmentGroups / kSegmentPlanThreads;
    const int g0 = threadIdx.x * per_thread;
    int segs[per_thread], my_segs = 0, my_slots = 0, my_splits = 0;
#pragma unroll
    for (int i = 0; i < per_thread; i++) {
        const int g = g0 + i;
        segs[i] = g < G ? (int)ceil_div(s.group_offset[g + 1] - s.group_offset[g], s.rows) : 0;
        my_segs += segs[i];
        my_slots += max(segs[i] - 1, 0);
        my_splits += segs[i] > 1;
    }
    int seg_at, slot_at, split_at, total_segs, total_splits;
    Scan(scratch).ExclusiveSum(my_segs, seg_at, total_segs);
    __syncthreads();
    Scan(scratch).ExclusiveSum(my_slots, slot_at);
    __syncthreads();
    Scan(scratch).ExclusiveSum(my_splits, split_at, total_splits);
#pragma unroll
    for (int i = 0; i < per_thread; i++) {
        const int g = g0 + i;
        for (int j = 0; j < segs[i]; j++, seg_at++) {
            s.seg_group[seg_at] = g;
            s.seg_begin[seg_at] = s.group_offset[g] + j * s.rows;
            s.seg_slot[seg_at] = j == 0 ? -1 : slot_at + j - 1;
        }
        if (segs[i] > 1) {
            s.split_group[split_at] = g;
            s.split_first_slot[split_at] = slot_at;
            s.split_slots[split_at++] = segs[i] - 1;
        }
        slot_at += max(segs[i] - 1, 0);
    }
    if (threadIdx.x == 0) {
        *s.num_segments = total_segs;
        *s.num_split = total_splits;
    }
}

// grad[g] += Σ over g's slots, in slot order, of tensor `tensor`'s partials. Block (element chunk,
// split group).
__global__ void reduce_partials_kernel(float* grad, const GradSegments s, int tensor) {
    if ((int)blockIdx.y >= *s.num_split) return;
    const int g = s.split_group[blockIdx.y], first = s.split_first_slot[blockIdx.y], n = s.split_slots[blockIdx.y];
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= s.group_elems) return;
    float v = grad[g * s.group_elems + i];
    for (int j = 0; j < n; j++) v += s.partials[((int64_t)(first + j) * s.tensors + tensor) * s.group_elems + i];
    grad[g * s.group_elems + i] = v;
}

// Owns the segment plan's storage and the partial slots of one kind of weight-gradient call.
class GradSegmenter {
  public:
    // groups: G; max_copies: the most copies a call sums; tiles: output tiles per group of the
    // kernels (blocks per segment); group_elems: one group's elements of one gradient; tensors:
    // gradients one kernel writes; target_blocks: blocks to aim for (0: four per SM).
    GradSegmenter(int groups, int64_t max_copies, int tiles, int64_t group_elems, int tensors, int target_blocks = 0)
        : groups_(groups), tiles_(tiles), tensors_(tensors), group_elems_(group_elems) {
        if (groups > kMaxSegmentGroups) die("config", "more than 4096 expert groups", "GradSegmenter", __FILE__, __LINE__);
        if (target_blocks <= 0) {
            int device, sms;
            CUDA_CHECK(cudaGetDevice(&device));
            CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
            target_blocks = 4 * sms;
        }
        target_blocks_ = target_blocks;
        max_slots_ = (int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(target_blocks, tiles),
                                                                 ceil_div(max_copies, kMinSegmentRows)));
        max_segments_ = groups + max_slots_;
        for (auto* b : {&seg_group_, &seg_begin_, &seg_slot_}) b->resize(max_segments_);
        for (auto* b : {&split_group_, &split_first_slot_, &split_slots_}) b->resize(max_slots_);
        counts_.resize(2);
        partials_.resize((size_t)max_slots_ * tensors * group_elems);
    }

    // Blocks along the segment dimension of a weight-gradient launch (unused ones return at once).
    int max_segments() const { return max_segments_; }

    // Plans the segments of a call summing `copies` copies grouped by group_offset (G + 1, device).
    GradSegments plan(const int* group_offset, int64_t copies, cudaStream_t stream) {
        // rows >= copies / max_slots, so no routing needs more than max_slots slots
        const int64_t rows = std::max<int64_t>({kMinSegmentRows, ceil_div(copies * tiles_, target_blocks_),
                                                ceil_div(copies, max_slots_)});
        GradSegments s{group_offset, seg_group_.get(), seg_begin_.get(), seg_slot_.get(), counts_.get(),
                       split_group_.get(), split_first_slot_.get(), split_slots_.get(), counts_.get() + 1,
                       (int)(ceil_div(rows, kMinSegmentRows) * kMinSegmentRows), partials_.get(), tensors_, group_elems_};
        plan_segments_kernel<<<1, kSegmentPlanThreads, 0, stream>>>(s, groups_);
        CUDA_CHECK_LAUNCH();
        return s;
    }

    // Adds the partial slots of gradient tensor `tensor` into grad (G, group_elems), after the
    // weight-gradient kernel that filled them.
    void reduce(float* grad, const GradSegments& s, int tensor, cudaStream_t stream) const {
        reduce_partials_kernel<<<dim3((unsigned)ceil_div(group_elems_, 256), max_slots_), 256, 0, stream>>>(grad, s, tensor);
        CUDA_CHECK_LAUNCH();
    }

  private:
    int groups_, tiles_, tensors_, target_blocks_, max_slots_, max_segments_;
    int64_t group_elems_;
    DeviceBuffer<int> seg_group_, seg_begin_, seg_slot_, split_group_, split_first_slot_, split_slots_, counts_;
    DeviceBuffer<float> partials_;
};

}  // namespace lmoe
