// Memory the GPUs of one host load from and store to directly (NCCL's device API, "LSA": load/store
// accessible over NVLink or PCIe peer-to-peer): buffers registered as symmetric windows, and the
// device communicator whose barriers let kernels on every rank meet. Used by Expert Parallel's
// device exchange (parallel/expert_dispatch.cuh), which moves rows without the host learning their
// counts.
#pragma once
#include <nccl.h>
#include <nccl_device.h>

#include <cstdio>
#include <utility>

#include "parallel/comm.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

// Rows every rank allocates with the same size, then registers with NCCL (a collective call): each
// rank's kernels can then reach any other rank's copy through ncclGetLsaPointer. Without a
// communicator it is plain device memory (the host exchange, the one-GPU test).
class PeerRows {
  public:
    PeerRows() = default;
    PeerRows(size_t n, ncclComm_t comm) : n_(n), comm_(comm) {
        if (n == 0) return;
        if (!comm) {
            CUDA_CHECK(cudaMalloc(&ptr_, n * sizeof(floatX)));
            return;
        }
        NCCL_CHECK(ncclMemAlloc((void**)&ptr_, n * sizeof(floatX)));
        NCCL_CHECK(ncclCommWindowRegister(comm, ptr_, n * sizeof(floatX), &window_, NCCL_WIN_COLL_SYMMETRIC));
    }
    ~PeerRows() {
        if (!ptr_) return;
        if (!comm_) {
            cudaFree(ptr_);
            return;
        }
        cudaDeviceSynchronize();  // deregistering unmaps the peers' copies: no kernel may still reach them
        ncclCommWindowDeregister(comm_, window_);
        ncclMemFree(ptr_);
    }
    PeerRows(const PeerRows&) = delete;
    PeerRows& operator=(const PeerRows&) = delete;
    PeerRows& operator=(PeerRows&& o) noexcept {
        std::swap(ptr_, o.ptr_);
        std::swap(n_, o.n_);
        std::swap(comm_, o.comm_);
        std::swap(window_, o.window_);
        return *this;
    }
    floatX* get() const { return ptr_; }
    size_t size() const { return n_; }
    ncclWindow_t window() const { return window_; }  // null for plain memory

  private:
    floatX* ptr_ = nullptr;
    size_t n_ = 0;
    ncclComm_t comm_ = nullptr;
    ncclWindow_t window_ = nullptr;
};

// The device side of a communicator whose ranks all reach each other's memory, with `barriers`
// barriers for kernels of up to that many blocks. open() is collective; it returns false, holding
// nothing, where NCCL cannot give every rank load/store access to every other (ranks on several
// hosts, no peer-to-peer path, symmetric memory switched off), and rank 0 says why.
class DeviceComm {
  public:
    DeviceComm() = default;
    DeviceComm(const DeviceComm&) = delete;
    DeviceComm& operator=(const DeviceComm&) = delete;
    ~DeviceComm() {
        if (open_) ncclDevCommDestroy(comm_, &dev_);
    }
    bool open(const Comm& c, int barriers) {
        // Every rank on one host, agreed first: ncclDevCommCreate ends in a barrier of all ranks, which
        // a rank that fails its own checks early would never reach.
        int one_host = c.local_size == c.world;
        if (c.world > 1) MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &one_host, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
        if (!one_host) {
            if (c.rank == 0) std::printf("expert exchange: the ranks are on several hosts\n");
            return false;
        }
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 29, 0)
        ncclDevCommRequirements reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
#else
        ncclDevCommRequirements reqs{};
#endif
        reqs.lsaBarrierCount = barriers;
        comm_ = c.nccl;
        const ncclResult_t made = ncclDevCommCreate(comm_, &reqs, &dev_);
        open_ = made == ncclSuccess;
        if (!open_ && c.rank == 0)
            std::printf("expert exchange: NCCL's device communicator is not available (%s: %s)\n",
                        ncclGetErrorString(made), ncclGetLastError(comm_));
        const int world = c.world;
        int every_rank_reachable = open_ && dev_.lsaSize == world;
        if (world > 1)  // every rank takes the same path
            MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &every_rank_reachable, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
        if (!every_rank_reachable && open_ && c.rank == 0)
            std::printf("expert exchange: NCCL's load/store team holds %d of the %d ranks\n", dev_.lsaSize, world);
        if (!every_rank_reachable && open_) {
            NCCL_CHECK(ncclDevCommDestroy(comm_, &dev_));
            open_ = false;
        }
        return open_;
    }
    const ncclDevComm& get() const { return dev_; }

  private:
    ncclComm_t comm_ = nullptr;
    ncclDevComm dev_{};
    bool open_ = false;
};

}  // namespace lmoe
