// Expert Parallel's exchange (parallel/expert_dispatch.cuh) on one GPU. First R virtual ranks: each
// a routing plan grouped by the real kernels and buffers of one device; their device moves run one
// after another through LocalPeers (the kernels the trainer runs, with the owners' windows replaced
// by plain buffers). Every owner plan, send base and row count must equal the host arithmetic
// (expert_splits) and every row must land, bitwise, where the received and owner orders put it,
// with the outputs poisoned before and nothing written past the rows received, and the moves' count
// of rows leaving each rank must add up to what the routing sends. Routings: uniform, skewed onto one
// owner, one owner receiving nothing, one source keeping every copy at home, copies dropped (LocMoE's
// capacity: in no group). Then ExpertExchange itself on a one-rank NCCL communicator, both transports:
// its windows, barrier sessions and device row count run, and the two transports give the same bytes.
// With one rank the barriers have no peer to wait for and every row stays home, so the meetings
// across GPUs and the peer addressing are tested by test_multi_gpu alone.
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "parallel/expert_dispatch.cuh"
#include "tests/gpu_test_utils.cuh"

using lmoe::DeviceBuffer;
using lmoe::RoutingPlan;
using lmoe::RoutingPlans;

namespace {

enum class Routing { Uniform, SkewedToOwner0, Owner1Empty, Source0AtHome, SomeDropped };

struct Case {
    const char* name;
    int R, N, E, k, d;
    Routing routing;
};

// k distinct experts for each of N tokens, drawn from the experts `allowed` says yes to (weights).
std::vector<int> draw_selection(lmoe::Rng& rng, int N, int E, int k, const std::vector<double>& weight) {
    std::vector<int> sel((size_t)N * k);
    for (int t = 0; t < N; t++) {
        std::vector<double> w = weight;
        for (int j = 0; j < k; j++) {
            double total = std::accumulate(w.begin(), w.end(), 0.0), u = rng.uniform() * total;
            int e = 0;
            while (e < E - 1 && (u -= w[e]) > 0) e++;
            while (w[e] == 0) e = (e + 1) % E;  // rounding at the end of the walk
            sel[(size_t)t * k + j] = e;
            w[e] = 0;
        }
    }
    return sel;
}

std::vector<double> expert_weights(const Case& c, int rank) {
    const int Er = c.E / c.R;
    std::vector<double> w(c.E, 1.0);
    for (int e = 0; e < c.E; e++) {
        const int owner = e / Er;
        if (c.routing == Routing::SkewedToOwner0 && owner == 0) w[e] = 20;
        if (c.routing == Routing::Owner1Empty && owner == 1) w[e] = 0;
        if (c.routing == Routing::Source0AtHome && rank == 0 && owner != 0) w[e] = 0;
    }
    return w;
}

std::vector<floatX> random_rows(lmoe::Rng& rng, size_t rows, int d) {
    return gpu_test::to_device_type<floatX>(gpu_test::random_normal(rng, rows * d));
}

bool same_rows(const std::vector<floatX>& got, const std::vector<floatX>& want, size_t rows, int d) {
    return std::memcmp(got.data(), want.data(), rows * d * sizeof(floatX)) == 0;
}

// Every byte 0xFF: what the poisoned buffers hold where nothing was written.
bool still_poisoned(const std::vector<floatX>& v, size_t from) {
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(v.data());
    for (size_t i = from * sizeof(floatX); i < v.size() * sizeof(floatX); i++)
        if (bytes[i] != 0xFF) return false;
    return true;
}

// One virtual rank: its routing, its plan (grouped on the GPU), its rows, its owner plan.
struct VirtualRank {
    std::vector<int> sel;
    RoutingPlans plans, owner;
    DeviceBuffer<int> send_base, remote;
    std::vector<int> group_offset, copy_row;  // the grouped plan, downloaded
    explicit VirtualRank(const Case& c)
        : plans(RoutingPlans::routed(1, c.N, 1, c.E, c.k)),
          owner(RoutingPlans::received(1, c.R * c.N * c.k, c.E / c.R)), send_base(c.R), remote(2) {}
};

void check_virtual_ranks(const Case& c, lmoe::Rng& rng) {
    std::printf("%s: R = %d, N = %d, E = %d, k = %d, d = %d\n", c.name, c.R, c.N, c.E, c.k, c.d);
    const int R = c.R, E = c.E, Er = E / R, copies = c.N * c.k, capacity = R * copies;
    std::vector<VirtualRank> ranks;
    ranks.reserve(R);
    DeviceBuffer<int> counts((size_t)R * E);
    counts.poison();
    for (int r = 0; r < R; r++) {
        ranks.emplace_back(c);
        VirtualRank& v = ranks.back();
        v.sel = draw_selection(rng, c.N, E, c.k, expert_weights(c, r));
        if (c.routing == Routing::SomeDropped)  // about one copy in four over capacity: marked ~e
            for (int& e : v.sel)
                if (rng.below(4) == 0) e = ~e;
        const RoutingPlan p = v.plans[0];
        CUDA_CHECK(cudaMemcpy(p.sel, v.sel.data(), v.sel.size() * sizeof(int), cudaMemcpyHostToDevice));
        lmoe::group_copies(p, 0);
        lmoe::group_sizes_kernel<<<1, 256>>>(counts.get() + r * E, p.group_offset, E);  // the all-gather's rows
        CUDA_CHECK_LAUNCH();
        v.group_offset = gpu_test::download(p.group_offset, E + 1);
        v.copy_row = gpu_test::download(p.copy_row, copies);
    }
    const std::vector<int> table = counts.download();
    for (int r = 0; r < R; r++) {
        VirtualRank& v = ranks[r];
        v.owner.poison();
        v.send_base.poison();
        v.remote.poison();
        lmoe::build_owner_plan(v.owner[0], v.send_base.get(), v.remote.get(), counts.get(), r, R, 0);
    }
    CUDA_CHECK(cudaDeviceSynchronize());

    // The owner plans against the host arithmetic: sizes, offsets, received positions, tiles.
    std::vector<lmoe::ExpertSplits> splits(R);
    std::vector<std::vector<int>> owner_offset(R);  // owner q's group offsets in owner order
    for (int q = 0; q < R; q++) {
        splits[q] = lmoe::expert_splits(table, q, R, E);
        const RoutingPlan o = ranks[q].owner[0];
        owner_offset[q] = gpu_test::download(o.group_offset, Er + 1);
        const std::vector<int> send_base = ranks[q].send_base.download(), remote = ranks[q].remote.download();
        bool bases = true;
        for (int s = 0; s < R; s++) bases &= send_base[s] == splits[q].send_base[s];
        CHECK_MSG(bases, std::string(c.name) + ": rank " + std::to_string(q) + "'s send bases");
        CHECK_MSG(owner_offset[q][Er] == splits[q].received, std::string(c.name) + ": rows received at owner " +
                                                                 std::to_string(q));
        const int64_t sent_away = std::accumulate(splits[q].send.begin(), splits[q].send.end(), int64_t{0}) - splits[q].send[q];
        CHECK_MSG(remote[0] == sent_away && remote[1] == splits[q].received - splits[q].recv[q],
                  std::string(c.name) + ": rank " + std::to_string(q) + "'s rows to and from other ranks");
        // received position of every owner row, from the counts: source by source, expert by expert
        std::vector<int> want_row, want_offset(Er + 1, 0);
        std::vector<int> received_base((size_t)R * Er);
        for (int s = 0, pos = 0; s < R; s++)
            for (int e = 0; e < Er; e++) {
                received_base[s * Er + e] = pos;
                pos += table[s * E + q * Er + e];
            }
        for (int e = 0; e < Er; e++) {
            for (int s = 0; s < R; s++)
                for (int i = 0; i < table[s * E + q * Er + e]; i++) want_row.push_back(received_base[s * Er + e] + i);
            want_offset[e + 1] = (int)want_row.size();
        }
        const std::vector<int> got_row = gpu_test::download(o.copy_row, want_row.size());
        CHECK_MSG(owner_offset[q] == want_offset && got_row == want_row,
                  std::string(c.name) + ": owner plan of rank " + std::to_string(q));
        int tiles = 0;
        bool tiles_ok = true;
        const std::vector<int> tile_group = gpu_test::download(o.tile_group, o.max_tiles);
        const std::vector<int> tile_start = gpu_test::download(o.tile_start, o.max_tiles);
        for (int e = 0; e < Er; e++)
            for (int start = want_offset[e]; start < want_offset[e + 1]; start += lmoe::kExpertTileRows, tiles++)
                tiles_ok &= tile_group[tiles] == e && tile_start[tiles] == start;
        CHECK_MSG(tiles_ok && gpu_test::download(o.num_tiles, 1)[0] == tiles,
                  std::string(c.name) + ": tile list of owner " + std::to_string(q));
    }

    // Where copy i of source s (group order) sits at its owner: received and owner positions.
    auto owner_of = [&](int s, int i) {
        int q = 0;
        while (i >= ranks[s].group_offset[(q + 1) * Er]) q++;
        return q;
    };
    auto received_pos = [&](int s, int i) {
        const int q = owner_of(s, i);
        return (int)splits[s].send_base[q] + i - ranks[s].group_offset[q * Er];
    };
    auto owner_pos = [&](int s, int i) {
        const int q = owner_of(s, i);
        int e = 0;
        while (i >= ranks[s].group_offset[q * Er + e + 1]) e++;
        int pos = owner_offset[q][e] + i - ranks[s].group_offset[q * Er + e];
        for (int r = 0; r < s; r++) pos += table[r * E + q * Er + e];
        return pos;
    };

    std::vector<DeviceBuffer<floatX>> received(R), staging(R), owner_rows(R);
    lmoe::LocalPeers received_at{}, staging_at{};
    for (int q = 0; q < R; q++) {
        for (auto* b : {&received[q], &staging[q], &owner_rows[q]}) b->resize((size_t)capacity * c.d);
        received_at.base[q] = received[q].get();
        staging_at.base[q] = staging[q].get();
    }
    auto poison_owners = [&] {
        for (int q = 0; q < R; q++)
            for (auto* b : {&received[q], &staging[q], &owner_rows[q]}) b->poison();
    };
    // The rows each move counts as leaving its rank's memory, summed over the ranks, against the routing.
    DeviceBuffer<unsigned long long> rows_out(1);
    int64_t sent_away = 0;
    for (int q = 0; q < R; q++) sent_away += splits[q].received - splits[q].recv[q];
    auto expect_rows_out = [&](const std::string& what) {
        CHECK_MSG((int64_t)rows_out.download()[0] == sent_away,
                  std::string(c.name) + ": " + what + ": rows counted as sent to other ranks");
        CUDA_CHECK(cudaMemset(rows_out.get(), 0, sizeof(unsigned long long)));
    };
    CUDA_CHECK(cudaMemset(rows_out.get(), 0, sizeof(unsigned long long)));

    // dispatch: token rows, gathered through copy_row, pushed into the owners' received rows
    poison_owners();
    std::vector<std::vector<floatX>> x(R), want_received(R, std::vector<floatX>((size_t)capacity * c.d));
    std::vector<DeviceBuffer<floatX>> x_d(R);
    for (int s = 0; s < R; s++) {
        x[s] = random_rows(rng, c.N, c.d);
        x_d[s].upload(x[s]);
        const RoutingPlan p = ranks[s].plans[0];
        lmoe::move_copies<true>(received_at, x_d[s].get(), p.copy_row, p, ranks[s].send_base.get(), R, c.d,
                                ranks[s].remote.get(), rows_out.get(), 0);
        for (int i = 0; i < ranks[s].group_offset[E]; i++)
            std::memcpy(&want_received[owner_of(s, i)][(size_t)received_pos(s, i) * c.d],
                        &x[s][(size_t)ranks[s].copy_row[i] * c.d], c.d * sizeof(floatX));
    }
    for (int q = 0; q < R; q++) {
        const std::vector<floatX> got = received[q].download();
        CHECK_MSG(same_rows(got, want_received[q], splits[q].received, c.d) && still_poisoned(got, splits[q].received * c.d),
                  std::string(c.name) + ": dispatch, rows received at owner " + std::to_string(q));
    }
    expect_rows_out("dispatch");

    // to_owners: rows in group order pushed into the owners' staging, then put in owner order
    poison_owners();
    std::vector<std::vector<floatX>> want_owner(R, std::vector<floatX>((size_t)capacity * c.d));
    std::vector<DeviceBuffer<floatX>> rows_d(R);
    for (int s = 0; s < R; s++) {
        const int n = ranks[s].group_offset[E];
        const std::vector<floatX> rows = random_rows(rng, copies, c.d);
        rows_d[s].upload(rows);
        const RoutingPlan p = ranks[s].plans[0];
        lmoe::move_copies<true>(staging_at, rows_d[s].get(), nullptr, p, ranks[s].send_base.get(), R, c.d, nullptr,
                                nullptr, 0);
        for (int i = 0; i < n; i++)
            std::memcpy(&want_owner[owner_of(s, i)][(size_t)owner_pos(s, i) * c.d], &rows[(size_t)i * c.d],
                        c.d * sizeof(floatX));
    }
    for (int q = 0; q < R; q++) {
        const RoutingPlan o = ranks[q].owner[0];
        lmoe::permute_rows(owner_rows[q].get(), staging[q].get(), o.copy_row, o.group_offset + Er, capacity, c.d, true, 0);
        const std::vector<floatX> got = owner_rows[q].download();
        CHECK_MSG(same_rows(got, want_owner[q], splits[q].received, c.d) && still_poisoned(got, splits[q].received * c.d),
                  std::string(c.name) + ": to_owners, owner rows of rank " + std::to_string(q));
    }

    // to_sources: owner rows put back in received order, then pulled by their sources
    poison_owners();
    std::vector<std::vector<floatX>> y(R);
    for (int q = 0; q < R; q++) {
        y[q] = random_rows(rng, capacity, c.d);
        owner_rows[q].upload(y[q]);
        const RoutingPlan o = ranks[q].owner[0];
        lmoe::permute_rows(staging[q].get(), owner_rows[q].get(), o.copy_row, o.group_offset + Er, capacity, c.d, false, 0);
    }
    for (int s = 0; s < R; s++) {
        const int n = ranks[s].group_offset[E];
        rows_d[s].poison();
        const RoutingPlan p = ranks[s].plans[0];
        lmoe::move_copies<false>(staging_at, rows_d[s].get(), nullptr, p, ranks[s].send_base.get(), R, c.d,
                                 ranks[s].remote.get() + 1, rows_out.get(), 0);
        std::vector<floatX> want((size_t)copies * c.d);
        for (int i = 0; i < n; i++)
            std::memcpy(&want[(size_t)i * c.d], &y[owner_of(s, i)][(size_t)owner_pos(s, i) * c.d], c.d * sizeof(floatX));
        const std::vector<floatX> got = rows_d[s].download();
        CHECK_MSG(same_rows(got, want, n, c.d) && still_poisoned(got, (size_t)n * c.d),
                  std::string(c.name) + ": to_sources, rows back at rank " + std::to_string(s));
    }
    expect_rows_out("to_sources");
}

// ExpertExchange on a one-rank NCCL communicator: the device transport (windows, barriers, the row
// count on the device) and the host one (ncclSend/ncclRecv to itself) move one layer's rows, and both
// must give the rows the plan implies and bitwise the same results.
void check_one_rank_exchange(lmoe::Rng& rng) {
    std::printf("ExpertExchange on a one-rank NCCL communicator\n");
    const int N = 300, E = 8, k = 2, d = 64, copies = N * k;
    ncclUniqueId id;
    NCCL_CHECK(ncclGetUniqueId(&id));
    lmoe::Comm comm;
    NCCL_CHECK(ncclCommInitRank(&comm.nccl, 1, id, 0));
    RoutingPlans plans = RoutingPlans::routed(1, N, 1, E, k);
    const RoutingPlan p = plans[0];
    const std::vector<int> sel = draw_selection(rng, N, E, k, std::vector<double>(E, 1.0));
    CUDA_CHECK(cudaMemcpy(p.sel, sel.data(), sel.size() * sizeof(int), cudaMemcpyHostToDevice));
    lmoe::group_copies(p, 0);
    const std::vector<int> copy_row = gpu_test::download(p.copy_row, copies);
    const std::vector<floatX> x = random_rows(rng, N, d), g = random_rows(rng, copies, d);
    DeviceBuffer<floatX> x_d, g_d, owner_rows((size_t)copies * d), back((size_t)copies * d);
    x_d.upload(x);
    g_d.upload(g);
    std::vector<floatX> want_received((size_t)copies * d);
    for (int i = 0; i < copies; i++)
        std::memcpy(&want_received[(size_t)i * d], &x[(size_t)copy_row[i] * d], d * sizeof(floatX));
    std::vector<std::vector<floatX>> results;
    for (const bool device : {true, false}) {
        lmoe::ExpertExchange ex(1, N, E, k, d, comm, device);
        if (device && ex.transport() != lmoe::ExpertTransport::Device) {  // no symmetric memory here: said above
            std::printf("skipped: the device transport (NCCL cannot make a device communicator here)\n");
            continue;
        }
        CHECK_MSG(ex.transport() == (device ? lmoe::ExpertTransport::Device : lmoe::ExpertTransport::Host),
                  std::string("transport ") + (device ? "device" : "host") + " taken");
        owner_rows.poison();
        back.poison();
        CUDA_CHECK(cudaMemset(ex.received_rows(0), 0xFF, (size_t)ex.capacity() * d * sizeof(floatX)));
        ex.dispatch(0, x_d.get(), p, comm, 0);
        ex.to_owners(0, owner_rows.get(), g_d.get(), p, comm, 0);
        ex.to_sources(0, back.get(), owner_rows.get(), p, comm, 0);
        const std::vector<floatX> received = gpu_test::download(ex.received_rows(0), (size_t)copies * d);
        // one rank: received order = owner order = group order
        CHECK_MSG(same_rows(received, want_received, copies, d), std::string(transport_name(ex.transport())) +
                                                                     ": dispatch gives the copies' rows");
        CHECK_MSG(same_rows(owner_rows.download(), g, copies, d) && same_rows(back.download(), g, copies, d),
                  std::string(transport_name(ex.transport())) + ": to_owners and to_sources give the rows back");
        CHECK_MSG(ex.take_bytes_sent(0) == 0, "one rank sends nothing to other ranks");
        results.push_back(received);
        results.push_back(back.download());
    }
    if (results.size() == 4)
        CHECK_MSG(results[0] == results[2] && results[1] == results[3], "device and host transports: the same bytes");
    NCCL_CHECK(ncclCommDestroy(comm.nccl));
}

}  // namespace

int main() {
    gpu_test::skip_without_gpu();
    lmoe::Rng rng(2031);
    const Case cases[] = {
        {"two ranks", 2, 96, 8, 2, 64, Routing::Uniform},
        {"four ranks, odd tokens", 4, 301, 16, 3, 72, Routing::Uniform},
        {"eight ranks, p1-like", 8, 1024, 64, 8, 256, Routing::Uniform},
        {"skewed onto owner 0", 4, 500, 16, 4, 128, Routing::SkewedToOwner0},
        {"owner 1 receives nothing", 4, 200, 8, 2, 64, Routing::Owner1Empty},
        {"source 0 keeps every copy", 4, 200, 8, 2, 64, Routing::Source0AtHome},
        {"one rank", 1, 130, 8, 2, 64, Routing::Uniform},
        {"sixteen ranks, two experts each", 16, 64, 32, 4, 64, Routing::Uniform},
        {"copies dropped", 4, 256, 16, 4, 64, Routing::SomeDropped},
    };
    for (const Case& c : cases) check_virtual_ranks(c, rng);
    check_one_rank_exchange(rng);
    return check::summary();
}
