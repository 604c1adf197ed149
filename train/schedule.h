// Learning-rate schedule (SPEC §2.4): linear warm-up, then cosine decay to a floor. Host-only.
#pragma once
#include <cmath>

namespace lmoe {

// lr at optimizer step `step` (0-based) of `total`: lr·(step+1)/warmup during warm-up, then
// lr_min + ½(1 + cos(π·progress))·(lr − lr_min), progress going 0 → 1 over the remaining steps.
inline double lr_at(int step, int total, double lr, int warmup, double floor_fraction) {
    if (step < warmup) return lr * (step + 1) / warmup;
    double lr_min = lr * floor_fraction;
    int decay_steps = total - warmup;
    double progress = decay_steps <= 1 ? 1.0 : double(step - warmup) / (decay_steps - 1);
    return lr_min + 0.5 * (1.0 + std::cos(M_PI * std::min(progress, 1.0))) * (lr - lr_min);
}

}  // namespace lmoe
