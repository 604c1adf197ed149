// Minimal test harness: CHECK records a failure and goes on, so one run reports every problem.
// Each test binary ends with check_summary(), which prints "N passed, N failed" and returns the
// exit code CTest reads (0 pass, 1 fail, 77 skipped — see CMakeLists.txt's SKIP_RETURN_CODE).
#pragma once
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>

namespace check {

inline int& passed() { static int n = 0; return n; }
inline int& failed() { static int n = 0; return n; }

inline void record(bool ok, const char* file, int line, const std::string& what) {
    if (ok) { passed()++; return; }
    failed()++;
    std::fprintf(stderr, "FAIL %s:%d: %s\n", file, line, what.c_str());
}

// Runs `body` and expects it to throw an exception whose message contains `needle`.
inline bool throws_with(const std::function<void()>& body, const std::string& needle, std::string* got) {
    try { body(); } catch (const std::exception& e) {
        *got = e.what();
        return got->find(needle) != std::string::npos;
    }
    *got = "(no exception)";
    return false;
}

inline int summary() {
    std::printf("%d passed, %d failed\n", passed(), failed());
    return failed() == 0 ? 0 : 1;
}

}  // namespace check

#define CHECK(cond) check::record((cond), __FILE__, __LINE__, #cond)
#define CHECK_MSG(cond, msg) check::record((cond), __FILE__, __LINE__, std::string(#cond) + " -- " + (msg))
// Expects `stmt` to throw with a message containing `needle` (a clear error, not a crash).
#define CHECK_THROWS(stmt, needle)                                                              \
    do {                                                                                        \
        std::string got_;                                                                       \
        bool ok_ = check::throws_with([&] { stmt; }, (needle), &got_);                          \
        check::record(ok_, __FILE__, __LINE__,                                                  \
                      std::string(#stmt) + " should fail with '" + (needle) + "', got: " + got_); \
    } while (0)
