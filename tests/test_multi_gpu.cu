// Head Parallel on R GPUs against one GPU (SPEC §3, §8.4). Start with mpirun -np R. One global batch
// of B_global sequences; rank r trains on its slice, exchanges sub-tokens with the head owners, and
// syncs gradients; rank 0 then compares the loss and every gradient (replicated ones from any rank,
// expert shards gathered from their owners) with a one-GPU model on the whole batch, and the bytes
// each rank sent with SPEC §3's 4·N·H·dh·(R−1)/R·2 per layer.
#define LMOE_NO_MAIN
#include "train_latentmoe.cu"
#include "tests/gpu_test_utils.cuh"

using namespace lmoe;

#ifdef LMOE_FP32
constexpr double kTolerance = 1e-5;
#else
constexpr double kTolerance = 5e-2;
#endif

int main(int argc, char** argv) {
    gpu_test::skip_without_gpu();
    Comm comm = comm_init(&argc, &argv);
    const bool lead = comm.rank == 0;
    Config global;
    apply_preset(global, "tiny");
    global.H = 8; global.dh = 16;  // H divisible by R = 1, 2, 4, 8 (H·dh need not equal d)
    global.B = 8;
    if (global.B % comm.world != 0 || global.H % comm.world != 0) {
        if (lead) std::printf("this test needs R to divide 8\n0 passed, 1 failed\n");
        MPI_Finalize();
        return 1;
    }
    Config local = global;
    local.B = global.B / comm.world;
    const int Ng = global.B * global.T, Nl = local.B * local.T;
    lmoe::Rng rng(4242);  // the same batch on every rank
    std::vector<int32_t> tokens(Ng), targets(Ng);
    for (int i = 0; i < Ng; i++) { tokens[i] = rng.below(global.V); targets[i] = rng.below(global.V); }

    GpuModel<LatentMoeFfn> model(local, comm);
    model.zero_grad();
    model.forward(tokens.data() + comm.rank * Nl, targets.data() + comm.rank * Nl, 1.f);
    model.backward();
    model.sync_gradients();
    const float loss = model.mean_loss_global();
    const int64_t bytes = model.take_bytes_sent();
    std::vector<float> local_grads = model.grads.download();
    std::vector<float> all((size_t)comm.world * local_grads.size());
    MPI_CHECK(MPI_Gather(local_grads.data(), (int)local_grads.size(), MPI_FLOAT, all.data(), (int)local_grads.size(),
                         MPI_FLOAT, 0, MPI_COMM_WORLD));
    std::vector<long long> sent(comm.world);
    long long mine = bytes;
    MPI_CHECK(MPI_Gather(&mine, 1, MPI_LONG_LONG, sent.data(), 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD));

    if (lead) {
        std::printf("R = %d: %d tokens per rank, %d in the global batch\n", comm.world, Nl, Ng);
        GpuModel<LatentMoeFfn> one(global, Comm{});
        one.zero_grad();
        one.forward(tokens.data(), targets.data(), 1.f);
        one.backward();
        const float one_loss = one.mean_loss_global();
        std::vector<float> one_grads = one.grads.download();
        const double loss_err = std::abs(loss - one_loss) / std::abs(one_loss);
        std::printf("  loss: R GPUs %.7f, one GPU %.7f, rel err %.2e\n", loss, one_loss, loss_err);
        CHECK_MSG(loss_err < kTolerance, "the loss differs from the one-GPU run");
        // every rank's replicated gradients must be the same bits after the all-reduce
        bool replicas_equal = true;
        for (int r = 1; r < comm.world; r++)
            replicas_equal &= std::equal(all.begin(), all.begin() + model.layout.replicated,
                                         all.begin() + (size_t)r * local_grads.size());
        CHECK_MSG(replicas_equal, "replicated gradients differ between ranks after the all-reduce");
        for (const TensorSpec& t : one.layout.tensors) {
            std::vector<double> got(t.numel), want(one_grads.begin() + t.offset, one_grads.begin() + t.offset + t.numel);
            for (int r = 0; r < comm.world; r++) {
                const ParamLayout lr = build_param_layout(local, r, comm.world);
                const TensorSpec& ts = lr.find(t.name);
                if (!t.expert && r > 0) continue;
                for (int64_t i = 0; i < ts.numel; i++)
                    got[ts.global_first + i] = all[(size_t)r * local_grads.size() + ts.offset + i];
            }
            gpu_test::expect_close("d" + t.name, got, want, kTolerance);
        }
        const int64_t expected = (int64_t)global.L * 4 * Nl * global.H * global.dh * (comm.world - 1) / comm.world *
                                 (int64_t)sizeof(floatX);
        for (int r = 0; r < comm.world; r++)
            CHECK_MSG(sent[r] == expected, "rank " + std::to_string(r) + " sent " + std::to_string(sent[r]) +
                                               " bytes, SPEC §3 predicts " + std::to_string(expected));
        std::printf("  bytes sent per rank per step: %lld (SPEC §3: L·4·N·H·dh·(R−1)/R·%d = %lld)\n", sent[0],
                    (int)sizeof(floatX), (long long)expected);
    }
    int failed = lead ? check::failed() : 0;
    MPI_CHECK(MPI_Bcast(&failed, 1, MPI_INT, 0, MPI_COMM_WORLD));
    const int status = lead ? check::summary() : (failed ? 1 : 0);
    comm_finalize(comm);
    return status;
}
