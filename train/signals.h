// The signals that end a training run: the loop finishes its step, saves a checkpoint and exits with
// 128 + the signal's number, the status a shell reports for a process the signal killed (130 for
// Ctrl-C, 143 for SIGTERM, 129 for SIGHUP). Host-only.
#pragma once
#include <signal.h>

#include <csignal>

namespace lmoe {

// The signal that asked the loop to stop after the current step; 0 while none has.
inline volatile std::sig_atomic_t stop_signal = 0;

// A second signal of the same kind kills at once: the user meant it.
inline void request_stop(int signal_number) {
    stop_signal = signal_number;
    std::signal(signal_number, SIG_DFL);
}

// SIGINT (Ctrl-C), SIGTERM (kill, a scheduler's time limit) and SIGHUP (the terminal went away) stop the
// run cleanly; a SIGHUP ignored already (nohup) stays ignored. (SIGPIPE is ignored from the start of
// trainer_main, train/main.cuh.)
inline void install_stop_handler() {
    std::signal(SIGINT, request_stop);
    std::signal(SIGTERM, request_stop);
    struct sigaction hup;
    if (sigaction(SIGHUP, nullptr, &hup) != 0 || hup.sa_handler != SIG_IGN) std::signal(SIGHUP, request_stop);
}

inline const char* signal_name(int signal_number) {
    switch (signal_number) {
        case SIGINT: return "SIGINT";
        case SIGTERM: return "SIGTERM";
        case SIGHUP: return "SIGHUP";
        default: return "a signal";
    }
}

}  // namespace lmoe
