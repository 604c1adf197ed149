// Seeded random numbers. Host-only.
// Weights are drawn from a counter-based generator: element i of tensor s depends only on
// (seed, s, i), so a rank that holds a shard of a tensor draws exactly the numbers a one-rank run
// draws for those elements, and initialisation needs no communication.
#pragma once
#include <cmath>
#include <cstdint>

namespace lmoe {

// A strong 64-bit mix (splitmix64's finaliser): consecutive inputs give unrelated outputs.
inline uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Uniform in (0, 1): the top 53 bits, offset by half a step so that log() never sees 0.
inline double unit_open(uint64_t bits) { return ((bits >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

// Standard normal number `index` of stream `stream` (Box–Muller on two hashed uniforms).
inline double normal_at(uint64_t seed, uint64_t stream, uint64_t index) {
    uint64_t base = mix64(seed ^ mix64(stream + 0x632BE59BD9B4E019ull)) ^ (index * 2);
    double u1 = unit_open(mix64(base)), u2 = unit_open(mix64(base ^ 1));
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// A sequential generator for tests and data: uniform, normal and integer draws.
class Rng {
  public:
    explicit Rng(uint64_t seed) : state_(seed) {}
    uint64_t next_u64() { return mix64(state_++); }
    double uniform() { return unit_open(next_u64()); }                         // (0, 1)
    double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
    double normal() { return normal_at(state_++, 0, 0); }
    int below(int n) { return static_cast<int>(next_u64() % static_cast<uint64_t>(n)); }  // [0, n)

  private:
    uint64_t state_;
};

}  // namespace lmoe
