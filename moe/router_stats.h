// What a router reports besides its choices: both models hand one to the training loop after every
// optimizer step, which prints and logs it (train/step_log.h). Host-only.
#pragma once
#include <cstdint>
#include <vector>

namespace lmoe {

// LocMoE's auxiliary losses and capacity drops over one optimizer step (SPEC §2.6): L_aux and L_loc
// summed over the layers and averaged over the micro-steps and ranks, like the loss; the dropped copies
// per layer summed over them. All zero for the other routers.
struct RouterStats {
    double aux_loss = 0, loc_loss = 0;
    std::vector<int64_t> dropped;  // (L)
    int64_t total_dropped() const {
        int64_t n = 0;
        for (int64_t v : dropped) n += v;
        return n;
    }
};

}  // namespace lmoe
