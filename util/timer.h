// Wall-clock stopwatch for the training loop's per-step milliseconds: host time, so on the GPU it
// measures a step only once the step's final synchronisation has returned. Host-only.
#pragma once
#include <chrono>

namespace lmoe {

class Timer {
  public:
    Timer() : start_(std::chrono::steady_clock::now()) {}
    double ms() const {
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
    }

  private:
    std::chrono::steady_clock::time_point start_;
};

}  // namespace lmoe
