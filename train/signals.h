// The signals that end a training run: the loop finishes its step, saves a checkpoint and exits.
// Host-only.
#pragma once
#include <csignal>

namespace lmoe {

// Ctrl-C or SIGTERM asks the loop to stop after the current step and save; a second one kills at once.
inline volatile std::sig_atomic_t stop_requested = 0;

inline void request_stop(int signal_number) {
    stop_requested = 1;
    std::signal(signal_number, SIG_DFL);
}

inline void install_stop_handler() {
    std::signal(SIGINT, request_stop);
    std::signal(SIGTERM, request_stop);
}

}  // namespace lmoe
