// Head Parallel and Expert Parallel on R GPUs against one GPU (SPEC §3, §8.4). Start with mpirun -np R.
// One global batch of B_global sequences; rank r trains on its slice, exchanges sub-tokens with the
// head owners (or copies with the expert owners), and syncs gradients; rank 0 then compares the loss
// and every gradient (replicated ones from any rank, expert shards gathered from their owners) with a
// one-GPU model on the whole batch; both start from gradient buffers poisoned before zero_grad (each
// gradient element cleared there or written by the backward). Head Parallel's bytes must equal SPEC §3's 4·N·H·dh·(R−1)/R·2 per
// layer exactly; Expert Parallel's must equal what the rank's routing implies (four crossings per copy
// bound for another rank, plus the count tables), printed next to SPEC §3's balanced estimate. Expert
// Parallel runs with both of its transports (--ep-exchange device and host), which must give the same
// bits: the loss and every gradient on every rank.
#define LMOE_NO_MAIN
#include "moe_ep_baseline.cu"
#include "train_latentmoe.cu"
#include "tests/gpu_test_utils.cuh"

using namespace lmoe;

#ifdef LMOE_FP32
constexpr double kTolerance = 1e-5;
#else
constexpr double kTolerance = 5e-2;
#endif

// What a run leaves on rank 0, to compare runs bitwise: the loss and every rank's gradients.
struct RunResult {
    float loss = 0;
    std::vector<float> grads;
};

template <class Ffn>
RunResult check_parallel(const char* name, Config global, const Comm& comm) {
    const bool lead = comm.rank == 0;
    Config local = global;
    local.B = global.B / comm.world;
    const int Ng = global.B * global.T, Nl = local.B * local.T;
    lmoe::Rng rng(4242);  // the same batch on every rank
    std::vector<int32_t> tokens(Ng), targets(Ng);
    for (int i = 0; i < Ng; i++) { tokens[i] = rng.below(global.V); targets[i] = rng.below(global.V); }

    GpuModel<Ffn> model(local, comm);
    model.grads.poison();
    model.zero_grad();
    model.forward(tokens.data() + comm.rank * Nl, targets.data() + comm.rank * Nl, 1.f);
    model.backward();
    model.sync_gradients();
    const float loss = model.mean_loss_global();
    const int64_t bytes = model.take_bytes_sent();
    // Expert Parallel's copies from this rank to each rank's experts, over all layers.
    std::vector<long long> copies_to(comm.world, 0);
    if constexpr (Ffn::kind == FfnKind::MoE)
        for (int l = 0; l < global.L; l++)
            for (int e : model.ffn().selection(l)) copies_to[e / (global.E / comm.world)]++;
    std::vector<float> local_grads = model.grads.download();
    std::vector<float> all((size_t)comm.world * local_grads.size());
    MPI_CHECK(MPI_Gather(local_grads.data(), (int)local_grads.size(), MPI_FLOAT, all.data(), (int)local_grads.size(),
                         MPI_FLOAT, 0, MPI_COMM_WORLD));
    std::vector<long long> sent(comm.world), copies((size_t)comm.world * comm.world);
    long long mine = bytes;
    MPI_CHECK(MPI_Gather(&mine, 1, MPI_LONG_LONG, sent.data(), 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD));
    MPI_CHECK(MPI_Gather(copies_to.data(), comm.world, MPI_LONG_LONG, copies.data(), comm.world, MPI_LONG_LONG, 0,
                         MPI_COMM_WORLD));
    if (!lead) return {};
    // What Expert Parallel's routing implies rank r sends: its copies for other ranks' experts and
    // their gradients back out (x forward, d_o backward), the results for other ranks' copies
    // (o forward, dx backward), and its row of the count table to every other rank: (R − 1)·E
    // integers per layer.
    std::vector<long long> routed(comm.world, 0);
    for (int r = 0; r < comm.world; r++) {
        for (int q = 0; q < comm.world; q++)
            if (q != r) routed[r] += 2 * (copies[(size_t)r * comm.world + q] + copies[(size_t)q * comm.world + r]);
        routed[r] = routed[r] * global.d * (long long)sizeof(floatX) +
                    (long long)global.L * (comm.world - 1) * global.E * (long long)sizeof(int);
    }

    std::printf("%s, R = %d: %d tokens per rank, %d in the global batch\n", name, comm.world, Nl, Ng);
    GpuModel<Ffn> one(global, Comm{});
    one.grads.poison();
    one.zero_grad();
    one.forward(tokens.data(), targets.data(), 1.f);
    one.backward();
    const float one_loss = one.mean_loss_global();
    std::vector<float> one_grads = one.grads.download();
    const double loss_err = std::abs(loss - one_loss) / std::abs(one_loss);
    std::printf("  loss: R GPUs %.7f, one GPU %.7f, rel err %.2e\n", loss, one_loss, loss_err);
    CHECK_MSG(loss_err < kTolerance, std::string(name) + ": the loss differs from the one-GPU run");
    bool replicas_equal = true;  // every rank's replicated gradients: the same bits after the all-reduce
    for (int r = 1; r < comm.world; r++)
        replicas_equal &= std::equal(all.begin(), all.begin() + model.layout.replicated,
                                     all.begin() + (size_t)r * local_grads.size());
    CHECK_MSG(replicas_equal, std::string(name) + ": replicated gradients differ between ranks after the all-reduce");
    double worst = 0;
    for (const TensorSpec& t : one.layout.tensors) {
        std::vector<double> got(t.numel), want(one_grads.begin() + t.offset, one_grads.begin() + t.offset + t.numel);
        for (int r = 0; r < comm.world; r++) {
            if (!t.expert && r > 0) continue;
            const TensorSpec& ts = build_param_layout(local, r, comm.world).find(t.name);
            for (int64_t i = 0; i < ts.numel; i++)
                got[ts.global_first + i] = all[(size_t)r * local_grads.size() + ts.offset + i];
        }
        const double err = gpu_test::rel_error(got, want);
        worst = std::max(worst, err);
        CHECK_MSG(err <= kTolerance, std::string(name) + " d" + t.name + ": relative error " + std::to_string(err));
    }
    std::printf("  every gradient: worst relative error %.2e (tolerance %.0e)\n", worst, kTolerance);
    // SPEC §3 per layer: HP 4·N·H·dh·(R−1)/R elements exactly, EP 4·N·k·d·(R−1)/R when balanced
    const int64_t per_layer = 4LL * Nl * (global.ffn == FfnKind::LatentMoE ? (int64_t)global.H * global.dh
                                                                           : (int64_t)global.k * global.d) *
                              (comm.world - 1) / comm.world * (int64_t)sizeof(floatX);
    const bool exact = global.ffn == FfnKind::LatentMoE;  // else each rank's routing fixes its bytes
    std::printf("  bytes sent per rank per step:");
    for (int r = 0; r < comm.world; r++) std::printf(" %lld", sent[r]);
    std::printf(" (SPEC §3%s: %lld)\n", exact ? "" : ", balanced routing", (long long)(global.L * per_layer));
    if (!exact) {
        std::printf("  bytes each rank's routing implies:");
        for (int r = 0; r < comm.world; r++) std::printf(" %lld", routed[r]);
        std::printf("\n");
    }
    for (int r = 0; r < comm.world; r++) {
        const long long want = exact ? global.L * per_layer : routed[r];
        CHECK_MSG(sent[r] == want, std::string(name) + ": rank " + std::to_string(r) + " sent " +
                                       std::to_string(sent[r]) + " bytes, expected " + std::to_string(want));
    }
    return {loss, all};
}

int main(int argc, char** argv) {
    gpu_test::skip_without_gpu();
    Comm comm = comm_init(&argc, &argv);
    Config hp;
    apply_preset(hp, "tiny");
    hp.H = 8; hp.dh = 16;  // H divisible by R = 1, 2, 4, 8 (H·dh need not equal d)
    hp.B = 8;
    Config ep;
    ep.ffn = FfnKind::MoE;
    apply_preset(ep, "tiny");  // E = 8: divisible by R = 1, 2, 4, 8
    ep.B = 8;
    if (hp.B % comm.world != 0 || hp.H % comm.world != 0 || ep.E % comm.world != 0) {
        if (comm.rank == 0) std::printf("this test needs R to divide 8\n0 passed, 1 failed\n");
        comm_finalize(comm);
        return 1;
    }
    check_parallel<LatentMoeFfn>("Head Parallel", hp, comm);
    ep.ep_exchange = "device";
    const RunResult device = check_parallel<MoeFfn>("Expert Parallel, device exchange", ep, comm);
    ep.ep_exchange = "host";
    const RunResult host = check_parallel<MoeFfn>("Expert Parallel, host exchange", ep, comm);
    if (comm.rank == 0)
        CHECK_MSG(device.loss == host.loss && device.grads == host.grads,
                  "Expert Parallel: the device and host exchanges give different bits");
    int failed = comm.rank == 0 ? check::failed() : 0;
    MPI_CHECK(MPI_Bcast(&failed, 1, MPI_INT, 0, MPI_COMM_WORLD));
    const int status = comm.rank == 0 ? check::summary() : (failed ? 1 : 0);
    comm_finalize(comm);
    return status;
}
