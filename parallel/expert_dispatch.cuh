// Expert Parallel's exchange (SPEC §3): rank q owns experts [q·E/R, (q+1)·E/R). After routing and
// grouping (moe/routing_plan.cuh), a rank's copies for q's experts are one contiguous run of its group
// order. The ranks first swap per-expert counts (the metadata Head Parallel does without), learn the
// split sizes on the host, then move the copies with a variable-size all-to-all. The owner regroups
// what it received by its own experts (an "owner plan", so every expert's rows come source rank by
// source rank, each in token order: the one-GPU summation order), runs them, and the results travel
// back the same way.
//
// Orders of the rows at the owner:
//   received order: by source rank, then (expert, token) as the source grouped them — what NCCL delivers
//   owner order:    by local expert, then source rank, then token — what the grouped GEMMs walk
// owner_plan.copy_row[p] is the received position of owner row p.
#pragma once
#include <utility>
#include <vector>

#include "parallel/comm.cuh"
#include "util/cuda_utils.cuh"
#include "moe/routing_plan.cuh"

namespace lmoe {

// The split sizes of one layer's exchange, in rows, learned on the host.
struct ExpertSplits {
    std::vector<int64_t> send, recv;  // rows to / from each rank
    int64_t received = 0;             // Σ recv
};

// out[p] = in[index[p]] (gather) or out[index[p]] = in[p] (scatter), rows of d elements.
__global__ void permute_rows_kernel(floatX* out, const floatX* in, const int* index, int64_t rows, int d, bool gather) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * d) return;
    const int64_t p = idx / d, i = idx % d;
    if (gather) out[p * d + i] = in[(int64_t)index[p] * d + i];
    else out[(int64_t)index[p] * d + i] = in[p * d + i];
}

inline void permute_rows(floatX* out, const floatX* in, const int* index, int64_t rows, int d, bool gather,
                         cudaStream_t stream) {
    if (rows == 0) return;
    permute_rows_kernel<<<(unsigned)ceil_div(rows * d, 256), 256, 0, stream>>>(out, in, index, rows, d, gather);
    CUDA_CHECK_LAUNCH();
}

// The owner plan from the received counts (R, Er): group sizes and offsets in owner order, each
// owner row's received position, and the tile list. One block; a few thousand entries.
__global__ void build_owner_plan_kernel(RoutingPlan plan, const int* recv_counts, int R, int Er) {
    extern __shared__ int64_t received_base[];  // (R, Er): first received position of (source, expert)
    if (threadIdx.x == 0) {
        int64_t pos = 0;
        for (int r = 0; r < R; r++)
            for (int e = 0; e < Er; e++) {
                received_base[r * Er + e] = pos;
                pos += recv_counts[r * Er + e];
            }
        int copies = 0, tiles = 0;
        for (int e = 0; e < Er; e++) {
            plan.group_offset[e] = copies;
            int size = 0;
            for (int r = 0; r < R; r++) size += recv_counts[r * Er + e];
            for (int i = 0; i < (int)ceil_div(size, kExpertTileRows); i++) {
                plan.tile_group[tiles] = e;
                plan.tile_start[tiles++] = copies + i * kExpertTileRows;
            }
            copies += size;
        }
        plan.group_offset[Er] = copies;
        *plan.num_tiles = tiles;
    }
    __syncthreads();
    for (int e = 0; e < Er; e++) {
        int64_t p = plan.group_offset[e];
        for (int r = 0; r < R; r++) {
            const int n = recv_counts[r * Er + e];
            for (int i = threadIdx.x; i < n; i += blockDim.x) plan.copy_row[p + i] = (int)(received_base[r * Er + e] + i);
            p += n;
        }
    }
}

inline void build_owner_plan(const RoutingPlan& plan, const int* recv_counts, int R, cudaStream_t stream) {
    build_owner_plan_kernel<<<1, 1024, R * plan.E * sizeof(int64_t), stream>>>(plan, recv_counts, R, plan.E);
    CUDA_CHECK_LAUNCH();
}

// Swaps counts: rank r's counts for q's Er experts (from its group offsets) go to q. Then copies the
// send and receive sizes to the host — the one host synchronisation Expert Parallel needs per layer.
// plan: the local routing plan (one group per expert); send_counts, recv_counts: (R, Er) device scratch.
inline ExpertSplits exchange_expert_counts(int* recv_counts, int* send_counts, const RoutingPlan& plan, const Comm& c,
                                           cudaStream_t stream, int64_t* metadata_bytes) {
    const int R = c.world, E = plan.E, Er = E / R;
    const int* group_offset = plan.group_offset;
    std::vector<int> offsets(E + 1);
    CUDA_CHECK(cudaMemcpyAsync(offsets.data(), group_offset, (E + 1) * sizeof(int), cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<int> counts(E);
    for (int e = 0; e < E; e++) counts[e] = offsets[e + 1] - offsets[e];
    CUDA_CHECK(cudaMemcpyAsync(send_counts, counts.data(), E * sizeof(int), cudaMemcpyHostToDevice, stream));
    NCCL_CHECK(ncclGroupStart());
    for (int q = 0; q < R; q++) {
        NCCL_CHECK(ncclSend(send_counts + q * Er, Er, ncclInt32, q, c.nccl, stream));
        NCCL_CHECK(ncclRecv(recv_counts + q * Er, Er, ncclInt32, q, c.nccl, stream));
    }
    NCCL_CHECK(ncclGroupEnd());
    std::vector<int> received(R * Er);
    CUDA_CHECK(cudaMemcpyAsync(received.data(), recv_counts, R * Er * sizeof(int), cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    *metadata_bytes += (int64_t)(R - 1) * Er * sizeof(int);
    ExpertSplits s;
    s.send.assign(R, 0);
    s.recv.assign(R, 0);
    for (int q = 0; q < R; q++) {
        s.send[q] = offsets[(q + 1) * Er] - offsets[q * Er];
        for (int e = 0; e < Er; e++) s.recv[q] += received[q * Er + e];
        s.received += s.recv[q];
    }
    return s;
}

// Variable-size all-to-all of rows of d elements: send[q] rows (consecutive in `send`, rank order)
// to rank q, recv[r] rows from rank r (consecutive in `recv`). Returns the bytes sent to other ranks.
inline int64_t exchange_rows(floatX* recv_buf, const std::vector<int64_t>& recv, const floatX* send_buf,
                             const std::vector<int64_t>& send, int d, const Comm& c, cudaStream_t stream) {
    int64_t sent = 0, send_at = 0, recv_at = 0;
    NCCL_CHECK(ncclGroupStart());
    for (int q = 0; q < c.world; q++) {
        if (send[q] > 0)
            NCCL_CHECK(ncclSend(send_buf + send_at * d, send[q] * d * sizeof(floatX), ncclUint8, q, c.nccl, stream));
        if (recv[q] > 0)
            NCCL_CHECK(ncclRecv(recv_buf + recv_at * d, recv[q] * d * sizeof(floatX), ncclUint8, q, c.nccl, stream));
        if (q != c.rank) sent += send[q] * d * (int64_t)sizeof(floatX);
        send_at += send[q];
        recv_at += recv[q];
    }
    NCCL_CHECK(ncclGroupEnd());
    return sent;
}

// Expert Parallel's exchange for every layer of a model on R > 1 ranks: the owner plans, each layer's
// split sizes (learned in the forward, reused by its backward), the staging rows, and the bytes sent.
// Its three moves are the dispatch and combine of the MoE layer:
//   dispatch       token rows -> the experts' owners, received order (+ the owner plan)     forward
//   to_owners      rows in group order -> the owners, owner order (the copies' gradients)   backward
//   to_sources     owner rows -> the ranks the copies came from, group order                 both
class ExpertExchange {
  public:
    // tokens: N per rank; every copy may land on one owner (dropless), so R·N·k rows are kept.
    ExpertExchange(int layers, int tokens, int E, int k, int d, int world)
        : d_(d), capacity_((int)((int64_t)world * tokens * k)),
          owner_plans_(RoutingPlans::received(layers, capacity_, E / world)), splits_(layers) {
        send_counts_.resize(E);
        recv_counts_.resize(E);
        staging_.resize((size_t)capacity_ * d);
    }
    int capacity() const { return capacity_; }
    RoutingPlan owner_plan(int l) const { return owner_plans_[l]; }

    // x_received (capacity, d) = the rows of p's copies at their experts' owners, received order;
    // builds layer l's owner plan. Learning the split sizes synchronises the host once.
    RoutingPlan dispatch(int l, floatX* x_received, const floatX* x, const RoutingPlan& p, const Comm& comm,
                         cudaStream_t stream) {
        splits_[l] = exchange_expert_counts(recv_counts_.get(), send_counts_.get(), p, comm, stream, &bytes_sent_);
        permute_rows(staging_.get(), x, p.copy_row, p.copies(), d_, true, stream);  // (N·k, d) group order
        bytes_sent_ += exchange_rows(x_received, splits_[l].recv, staging_.get(), splits_[l].send, d_, comm, stream);
        const RoutingPlan owner = owner_plan(l);
        build_owner_plan(owner, recv_counts_.get(), comm.world, stream);
        return owner;
    }
    // owner_rows (capacity, d) in owner order = rows (N·k, d) in group order, sent to the owners.
    void to_owners(int l, floatX* owner_rows, const floatX* rows, const Comm& comm, cudaStream_t stream) {
        bytes_sent_ += exchange_rows(staging_.get(), splits_[l].recv, rows, splits_[l].send, d_, comm, stream);
        permute_rows(owner_rows, staging_.get(), owner_plan(l).copy_row, splits_[l].received, d_, true, stream);
    }
    // rows (N·k, d) in group order = owner_rows (owner order), sent back where the copies came from.
    void to_sources(int l, floatX* rows, const floatX* owner_rows, const Comm& comm, cudaStream_t stream) {
        permute_rows(staging_.get(), owner_rows, owner_plan(l).copy_row, splits_[l].received, d_, false, stream);
        bytes_sent_ += exchange_rows(rows, splits_[l].send, staging_.get(), splits_[l].recv, d_, comm, stream);
    }
    // Bytes sent to other ranks since the last call: rows and count metadata.
    int64_t take_bytes_sent() { return std::exchange(bytes_sent_, 0); }

  private:
    const int d_, capacity_;
    RoutingPlans owner_plans_;
    std::vector<ExpertSplits> splits_;
    DeviceBuffer<int> send_counts_, recv_counts_;  // (R, Er)
    DeviceBuffer<floatX> staging_;                  // (capacity, d): rows in received order
    int64_t bytes_sent_ = 0;
};

}  // namespace lmoe
