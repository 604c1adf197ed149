// Ranks and collectives (SPEC §3): MPI starts the ranks and shares NCCL's unique id; NCCL does every
// collective on the GPUs. A run without mpirun is one rank (MPI's singleton mode) and makes no NCCL
// calls at all. Each rank drives the GPU of its node-local rank, so the same code works across nodes.
#pragma once
#include <mpi.h>
#include <nccl.h>

#include <stdexcept>
#include <string>

#include "util/cuda_utils.cuh"

namespace lmoe {

struct Comm {
    int rank = 0, world = 1, local_rank = 0;
    int local_size = 1;  // ranks on this rank's host
    ncclComm_t nccl = nullptr;  // null when world == 1
    bool single() const { return world == 1; }
};

// MPI_Init, the node-local rank (ranks sharing a node), its GPU, and an NCCL communicator over all
// ranks. Throws ConfigError-like runtime errors with a clear reason (e.g. fewer GPUs than ranks).
inline Comm comm_init(int* argc, char*** argv) {
    Comm c;
    MPI_CHECK(MPI_Init(argc, argv));
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &c.rank));
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &c.world));
    MPI_Comm node;
    MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c.rank, MPI_INFO_NULL, &node));
    MPI_CHECK(MPI_Comm_rank(node, &c.local_rank));
    int ranks_here = 0;
    MPI_CHECK(MPI_Comm_size(node, &ranks_here));
    c.local_size = ranks_here;
    MPI_CHECK(MPI_Comm_free(&node));
    int gpus = 0;
    if (cudaGetDeviceCount(&gpus) != cudaSuccess) {
        cudaGetLastError();
        gpus = 0;
    }
    if (c.world == 1) {
        if (gpus > 0) CUDA_CHECK(cudaSetDevice(0));
        return c;
    }
    if (gpus < ranks_here)
        throw std::runtime_error(std::to_string(ranks_here) + " ranks on this node but only " + std::to_string(gpus) +
                                 " GPU(s): start at most one rank per GPU");
    CUDA_CHECK(cudaSetDevice(c.local_rank));
    ncclUniqueId id;
    if (c.rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD));
    NCCL_CHECK(ncclCommInitRank(&c.nccl, c.world, id, c.rank));
    return c;
}

inline void comm_finalize(Comm& c) {
    if (c.nccl) NCCL_CHECK(ncclCommDestroy(c.nccl));
    c.nccl = nullptr;
    MPI_Finalize();
}

// Data-parallel gradient averaging: one NCCL all-reduce over a contiguous block (the replicated
// gradients are laid out first, so this is a single large call, not one per tensor).
inline void all_reduce_average(float* buf, size_t n, const Comm& c, cudaStream_t stream) {
    if (c.single() || n == 0) return;
    NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat, ncclAvg, c.nccl, stream));
}

inline void all_reduce_sum(float* buf, size_t n, const Comm& c, cudaStream_t stream) {
    if (c.single() || n == 0) return;
    NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, c.nccl, stream));
}

inline void all_reduce_sum_int(int* buf, size_t n, const Comm& c, cudaStream_t stream) {
    if (c.single() || n == 0) return;
    NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclInt32, ncclSum, c.nccl, stream));
}

// Equal-block all-to-all: block q of `send` (elements [q·n, (q+1)·n)) goes to rank q, and block r of
// `recv` comes from rank r. Returns the bytes sent to other ranks, for the traffic accounting.
inline int64_t all_to_all_equal(const floatX* send, floatX* recv, size_t n, const Comm& c, cudaStream_t stream) {
    NCCL_CHECK(ncclGroupStart());
    for (int q = 0; q < c.world; q++) {
        NCCL_CHECK(ncclSend(send + q * n, n * sizeof(floatX), ncclUint8, q, c.nccl, stream));
        NCCL_CHECK(ncclRecv(recv + q * n, n * sizeof(floatX), ncclUint8, q, c.nccl, stream));
    }
    NCCL_CHECK(ncclGroupEnd());
    return (int64_t)(c.world - 1) * n * sizeof(floatX);
}

}  // namespace lmoe
