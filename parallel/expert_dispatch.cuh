// Expert Parallel's exchange (SPEC §3): rank q owns experts [q·E/R, (q+1)·E/R). After routing and
// grouping (moe/routing_plan.cuh), a rank's copies for q's experts are one contiguous run of its group
// order. The ranks all-gather their per-expert counts on the GPU (the metadata Head Parallel does
// without); from that (R, E) table each rank builds, on the GPU, the plan of the rows it receives (an
// "owner plan": every expert's rows come source rank by source rank, each in token order, the
// one-GPU summation order) and where its own runs land at their owners. The rows then move one of
// two ways (ExpertTransport):
//   device  kernels on every rank store rows into, or load them from, the owners' symmetric windows
//           (parallel/symmetric_memory.cuh): no count ever reaches the host, the step never waits
//           for one;
//   host    each layer's counts are read on the host (one synchronisation) and the rows move by a
//           variable-size ncclSend/ncclRecv all-to-all: for ranks that cannot reach each other's
//           memory (several hosts).
// Both put the same rows in the same places, so the two give bitwise the same training.
//
// Orders of the rows at the owner:
//   received order: by source rank, then (expert, token) as the source grouped them
//   owner order:    by local expert, then source rank, then token — what the grouped GEMMs walk
// owner_plan.copy_row[p] is the received position of owner row p. Source r's run for owner q starts
// at received row send_base_r[q] = Σ_{r' < r} Σ_{e of q} counts[r'][e] (expert_splits, on the host).
#pragma once
#include <memory>
#include <utility>
#include <vector>

#include "model/config.h"
#include "moe/routing_plan.cuh"
#include "parallel/comm.cuh"
#include "parallel/expert_splits.h"
#include "parallel/symmetric_memory.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

// Rows of d elements move as 16-byte vectors, one warp a row.
__device__ inline void copy_row_vectors(floatX* to, const floatX* from, int d, int lane) {
    const int n = d * (int)sizeof(floatX) / 16;
    uint4* t = reinterpret_cast<uint4*>(to);
    const uint4* f = reinterpret_cast<const uint4*>(from);
    for (int i = lane; i < n; i += 32) t[i] = f[i];
}

// out[p] = in[index[p]] (gather) or out[index[p]] = in[p] (scatter), for the first *rows rows
// (a count on the device), rows of d elements.
__global__ void permute_rows_kernel(floatX* out, const floatX* in, const int* index, const int* rows, int d,
                                    bool gather) {
    const int n = *rows, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int p = blockIdx.x * warps + threadIdx.x / 32; p < n; p += gridDim.x * warps) {
        const int64_t to = gather ? p : index[p], from = gather ? index[p] : p;
        copy_row_vectors(out + to * d, in + from * d, d, lane);
    }
}

inline void permute_rows(floatX* out, const floatX* in, const int* index, const int* rows, int max_rows, int d,
                         bool gather, cudaStream_t stream) {
    const int blocks = (int)std::min<int64_t>(ceil_div(max_rows, 8), 1024);
    if (blocks == 0) return;
    permute_rows_kernel<<<blocks, 256, 0, stream>>>(out, in, index, rows, d, gather);
    CUDA_CHECK_LAUNCH();
}

// sizes[e] = the copies of group e: this rank's row of the (R, E) count table.
__global__ void group_sizes_kernel(int* sizes, const int* group_offset, int E) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) sizes[e] = group_offset[e + 1] - group_offset[e];
}

// From the all-gathered counts (R, E): `rank`'s owner plan (group sizes and offsets in owner order,
// each owner row's received position, the tile list), send_base (R): where its run for each owner
// starts among that owner's received rows, and remote_rows (2): the copies it sends to other owners
// and those it receives from other ranks. One block; R·E is at most a few thousand entries.
__global__ void build_owner_plan_kernel(RoutingPlan plan, int* send_base, int* remote_rows, const int* counts,
                                        int rank, int R) {
    const int Er = plan.E, E = R * Er;
    extern __shared__ int received_base[];  // (R, Er): first received position of (source, expert)
    auto count = [&](int source, int e) { return counts[source * E + rank * Er + e]; };
    if (threadIdx.x == 0) {
        int pos = 0;
        for (int r = 0; r < R; r++)
            for (int e = 0; e < Er; e++) {
                received_base[r * Er + e] = pos;
                pos += count(r, e);
            }
        int copies = 0, tiles = 0, own = 0;
        for (int e = 0; e < Er; e++) {
            plan.group_offset[e] = copies;
            int size = 0;
            for (int r = 0; r < R; r++) size += count(r, e);
            for (int i = 0; i < (int)ceil_div(size, kExpertTileRows); i++) {
                plan.tile_group[tiles] = e;
                plan.tile_start[tiles++] = copies + i * kExpertTileRows;
            }
            copies += size;
            own += count(rank, e);
        }
        plan.group_offset[Er] = copies;
        *plan.num_tiles = tiles;
        int sent = 0;
        for (int e = 0; e < E; e++) sent += counts[rank * E + e];
        remote_rows[0] = sent - own;
        remote_rows[1] = copies - own;
    }
    for (int q = threadIdx.x; q < R; q += blockDim.x) {
        int base = 0;
        for (int r = 0; r < rank; r++)
            for (int e = 0; e < Er; e++) base += counts[r * E + q * Er + e];
        send_base[q] = base;
    }
    __syncthreads();
    for (int e = 0; e < Er; e++) {
        int p = plan.group_offset[e];
        for (int r = 0; r < R; r++) {
            const int n = count(r, e);
            for (int i = threadIdx.x; i < n; i += blockDim.x) plan.copy_row[p + i] = received_base[r * Er + e] + i;
            p += n;
        }
    }
}

inline void build_owner_plan(const RoutingPlan& owner, int* send_base, int* remote_rows, const int* counts, int rank,
                             int R, cudaStream_t stream) {
    build_owner_plan_kernel<<<1, 1024, R * owner.E * sizeof(int), stream>>>(owner, send_base, remote_rows, counts,
                                                                           rank, R);
    CUDA_CHECK_LAUNCH();
}

// Where the owners' rows are, for the device moves. LsaPeers: the ranks' symmetric windows, whose
// blocks of one index meet at an NCCL barrier. LocalPeers: R buffers of one GPU standing for R ranks
// whose moves run one after another (the one-GPU test), so there is nothing to meet.
struct LsaPeers {
    ncclDevComm comm;
    ncclWindow_t window;
    size_t offset;  // bytes into the window
    __device__ floatX* rows(int q) const { return static_cast<floatX*>(ncclGetPeerPointer(window, offset, q)); }
    struct Meeting {
        ncclLsaBarrierSession<ncclCoopCta> session;
        __device__ explicit Meeting(const LsaPeers& p) : session(ncclCoopCta(), p.comm, ncclTeamTagLsa(), blockIdx.x) {}
        // Block b of every rank arrives (its stores released), then waits for the others' block b.
        __device__ void all_ranks() { session.sync(ncclCoopCta(), cuda::memory_order_acq_rel); }
    };
};
struct LocalPeers {
    floatX* base[kMaxExpertRanks];
    __device__ floatX* rows(int q) const { return base[q]; }
    struct Meeting {
        __device__ explicit Meeting(const LocalPeers&) {}
        __device__ void all_ranks() {}
    };
};

// The device moves, run by the rank whose copies they are (the source), over its copies in group
// order: copy i, bound for owner q, is row send_base[q] + (i − first copy for q) of q's received rows.
// push (dispatch, to_owners): local[local_row[i] or i] -> owner; pull (to_sources): owner -> local[i].
// Every block meets the other ranks' blocks twice: before (push: each owner is done with what its
// window held; pull: each owner's rows are in it) and after (push: every row has landed; pull: every
// row has been read). A block only waits for blocks of other ranks, never of its own grid, and the
// grid fits on the GPU at once beside NCCL's kernels (the gradient buckets' all-reduce runs on
// another stream meanwhile), so the meetings cannot deadlock; a GPU shared with other processes
// (MPS) could delay them.
constexpr int kMoveBlocks = 64, kMoveThreads = 512;  // the device communicator holds kMoveBlocks barriers
template <class Peers, bool kPush>
__global__ void __launch_bounds__(kMoveThreads)
    move_copies_kernel(Peers peers, floatX* local, const int* local_row, const int* group_offset,
                       const int* send_base, int R, int Er, int d, const int* moved_rows,
                       unsigned long long* rows_out) {
    typename Peers::Meeting meeting(peers);
    __shared__ int first[kMaxExpertRanks + 1], base[kMaxExpertRanks];
    __shared__ floatX* owner_rows[kMaxExpertRanks];
    for (int q = threadIdx.x; q <= R; q += blockDim.x) {
        first[q] = group_offset[q * Er];
        if (q < R) {
            base[q] = send_base[q];
            owner_rows[q] = peers.rows(q);
        }
    }
    __syncthreads();
    meeting.all_ranks();
    if (rows_out && blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(rows_out, (unsigned long long)*moved_rows);
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32, copies = first[R];
    int q = 0;
    for (int i = blockIdx.x * warps + threadIdx.x / 32; i < copies; i += gridDim.x * warps) {
        while (i >= first[q + 1]) q++;  // i only grows
        floatX* theirs = owner_rows[q] + (int64_t)(base[q] + i - first[q]) * d;
        floatX* mine = local + (int64_t)(local_row ? local_row[i] : i) * d;
        if (kPush) copy_row_vectors(theirs, mine, d, lane);
        else copy_row_vectors(mine, theirs, d, lane);
    }
    meeting.all_ranks();
}

// Launches a move of p's copies (local is only read when pushing); where rows_out is given, adds
// *moved_rows, the rows that leave this rank's memory for other ranks, to it.
template <bool kPush, class Peers>
void move_copies(const Peers& owners, floatX* local, const int* local_row, const RoutingPlan& p, const int* send_base,
                 int R, int d, const int* moved_rows, unsigned long long* rows_out, cudaStream_t stream) {
    move_copies_kernel<Peers, kPush><<<kMoveBlocks, kMoveThreads, 0, stream>>>(
        owners, local, local_row, p.group_offset, send_base, R, p.E / R, d, moved_rows, rows_out);
    CUDA_CHECK_LAUNCH();
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

enum class ExpertTransport { Device, Host };
inline const char* transport_name(ExpertTransport t) { return t == ExpertTransport::Device ? "device" : "host"; }

// Expert Parallel's exchange for every layer of a model on R ranks: each layer's count table and
// owner plan (made in the forward, reused by its backward), the rows the owners received (kept for
// the backward), the staging rows, and the bytes sent. Its three moves are the dispatch and combine
// of the MoE layer:
//   dispatch       token rows -> the experts' owners, received order (+ the owner plan)     forward
//   to_owners      rows in group order -> the owners, owner order (the copies' gradients)   backward
//   to_sources     owner rows -> the ranks the copies came from, group order                 both
class ExpertExchange {
  public:
    // tokens: N per rank; every copy may land on one owner (dropless), so R·N·k rows are kept per
    // layer. Collective: every rank constructs it with the same arguments. The device transport is
    // taken where `device_allowed` and every rank reaches every other's memory, else the host one.
    ExpertExchange(int layers, int tokens, int E, int k, int d, const Comm& comm, bool device_allowed)
        : d_(d), R_(comm.world), rank_(comm.rank), E_(E), capacity_((int)((int64_t)comm.world * tokens * k)),
          transport_(device_allowed && device_comm_.open(comm, kMoveBlocks) ? ExpertTransport::Device
                                                                                             : ExpertTransport::Host),
          owner_plans_(RoutingPlans::received(layers, capacity_, E / comm.world)), splits_(layers) {
        if (R_ > kMaxExpertRanks)  // validate() refuses such a run first
            throw ConfigError("Expert Parallel runs on at most " + std::to_string(kMaxExpertRanks) + " ranks");
        counts_.resize((size_t)layers * R_ * E);
        send_base_.resize((size_t)layers * R_);
        remote_rows_.resize((size_t)layers * 2);
        rows_out_.resize(1);
        CUDA_CHECK(cudaMemset(rows_out_.get(), 0, sizeof(unsigned long long)));
        ncclComm_t windows = transport_ == ExpertTransport::Device ? comm.nccl : nullptr;
        received_ = PeerRows((size_t)layers * capacity_ * d, windows);
        staging_ = PeerRows((size_t)capacity_ * d, windows);
    }
    int capacity() const { return capacity_; }
    ExpertTransport transport() const { return transport_; }
    // Device bytes of the received and staging rows (all but a few kilobytes of what it holds).
    double row_bytes() const { return (double)(received_.size() + staging_.size()) * sizeof(floatX); }
    RoutingPlan owner_plan(int l) const { return owner_plans_[l]; }
    // Layer l's rows at this owner (capacity, d), received order: the experts' input, kept for the
    // backward.
    floatX* received_rows(int l) const { return received_.get() + (size_t)l * capacity_ * d_; }

    // received_rows(l) = the rows of p's copies at their experts' owners; builds layer l's owner plan.
    RoutingPlan dispatch(int l, const floatX* x, const RoutingPlan& p, const Comm& comm, cudaStream_t stream) {
        int* counts = layer_counts(l);
        group_sizes_kernel<<<1, 256, 0, stream>>>(counts + rank_ * E_, p.group_offset, E_);
        CUDA_CHECK_LAUNCH();
        NCCL_CHECK(ncclAllGather(counts + rank_ * E_, counts, E_, ncclInt32, comm.nccl, stream));
        bytes_sent_ += (int64_t)(R_ - 1) * E_ * sizeof(int);
        const RoutingPlan owner = owner_plan(l);
        build_owner_plan(owner, layer_send_base(l), layer_remote_rows(l), counts, rank_, R_, stream);
        if (transport_ == ExpertTransport::Device) {  // x is only read: its rows are pushed
            move<true>(peers(received_, l), const_cast<floatX*>(x), p.copy_row, p, l, stream);
            return owner;
        }
        std::vector<int> table((size_t)R_ * E_);
        CUDA_CHECK(cudaMemcpyAsync(table.data(), counts, table.size() * sizeof(int), cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));
        splits_[l] = expert_splits(table, rank_, R_, E_);
        permute_rows(staging_.get(), x, p.copy_row, p.group_offset + E_, capacity_, d_, true, stream);  // group order
        bytes_sent_ += exchange_rows(received_rows(l), splits_[l].recv, staging_.get(), splits_[l].send, d_, comm,
                                     stream);
        return owner;
    }
    // owner_rows (capacity, d) in owner order = rows (N·k, d) in group order, sent to the owners.
    void to_owners(int l, floatX* owner_rows, const floatX* rows, const RoutingPlan& p, const Comm& comm,
                   cudaStream_t stream) {
        if (transport_ == ExpertTransport::Device)  // rows are only read
            move<true>(peers(staging_, 0), const_cast<floatX*>(rows), nullptr, p, l, stream);
        else
            bytes_sent_ += exchange_rows(staging_.get(), splits_[l].recv, rows, splits_[l].send, d_, comm, stream);
        const RoutingPlan owner = owner_plan(l);
        permute_rows(owner_rows, staging_.get(), owner.copy_row, owner.group_offset + owner.E, capacity_, d_, true,
                     stream);
    }
    // rows (N·k, d) in group order = owner_rows (owner order), sent back where the copies came from.
    void to_sources(int l, floatX* rows, const floatX* owner_rows, const RoutingPlan& p, const Comm& comm,
                    cudaStream_t stream) {
        const RoutingPlan owner = owner_plan(l);
        permute_rows(staging_.get(), owner_rows, owner.copy_row, owner.group_offset + owner.E, capacity_, d_, false,
                     stream);
        if (transport_ == ExpertTransport::Device)
            move<false>(peers(staging_, 0), rows, nullptr, p, l, stream);
        else
            bytes_sent_ += exchange_rows(rows, splits_[l].send, staging_.get(), splits_[l].recv, d_, comm, stream);
    }
    // Bytes sent to other ranks since the last call: rows and the count tables. The device moves
    // count their rows on the device; taking them synchronises `stream`.
    int64_t take_bytes_sent(cudaStream_t stream) {
        int64_t bytes = std::exchange(bytes_sent_, 0);
        if (transport_ == ExpertTransport::Device) {
            bytes += (int64_t)rows_out_.download(stream)[0] * d_ * (int64_t)sizeof(floatX);
            CUDA_CHECK(cudaMemsetAsync(rows_out_.get(), 0, sizeof(unsigned long long), stream));
        }
        return bytes;
    }

  private:
    int* layer_counts(int l) const { return counts_.get() + (size_t)l * R_ * E_; }
    int* layer_send_base(int l) const { return send_base_.get() + (size_t)l * R_; }
    int* layer_remote_rows(int l) const { return remote_rows_.get() + 2 * l; }
    LsaPeers peers(const PeerRows& rows, int l) const {
        return {device_comm_.get(), rows.window(), (size_t)l * capacity_ * d_ * sizeof(floatX)};
    }
    // A device move of layer l's copies, counting the rows that leave this rank's memory for other
    // ranks: its copies for other owners (push), or the rows other ranks' copies take back (pull).
    template <bool kPush>
    void move(const LsaPeers& owners, floatX* local, const int* local_row, const RoutingPlan& p, int l,
              cudaStream_t stream) {
        lmoe::move_copies<kPush>(owners, local, local_row, p, layer_send_base(l), R_, d_,
                                 layer_remote_rows(l) + (kPush ? 0 : 1), rows_out_.get(), stream);
    }

    const int d_, R_, rank_, E_, capacity_;
    DeviceComm device_comm_;  // open for the device transport only
    const ExpertTransport transport_;
    RoutingPlans owner_plans_;
    std::vector<ExpertSplits> splits_;  // host transport: each layer's split sizes
    // per layer: the all-gathered counts (R, E), where this rank's runs land at each owner (R), and
    // the rows it sends to other owners and receives from other ranks (2)
    DeviceBuffer<int> counts_, send_base_, remote_rows_;
    DeviceBuffer<unsigned long long> rows_out_;  // device transport: rows sent since the last take
    PeerRows received_, staging_;                // (L, capacity, d) received order; (capacity, d)
    int64_t bytes_sent_ = 0;
};

}  // namespace lmoe
