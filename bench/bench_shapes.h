// The command line of the stage benchmarks: with no arguments every shape runs; otherwise only the
// shapes named (as printed, e.g. "p1" or "p1 crowded"), so that a profiler can look at one shape.
#pragma once
#include <cstdio>
#include <string>
#include <vector>

// Runs bench(shape) for the shapes argv names (all without arguments); 2 and the list of names for a
// name that is not one of them.
template <class Shape, class Bench>
int run_bench_shapes(int argc, char** argv, const std::vector<Shape>& shapes, Bench&& bench) {
    std::vector<bool> chosen(shapes.size(), argc == 1);
    for (int a = 1; a < argc; a++) {
        bool known = false;
        for (size_t i = 0; i < shapes.size(); i++)
            if (argv[a] == std::string(shapes[i].name)) chosen[i] = known = true;
        if (!known) {
            std::fprintf(stderr, "%s: no shape named \"%s\"; the shapes:", argv[0], argv[a]);
            for (const Shape& s : shapes) std::fprintf(stderr, " \"%s\"", s.name);
            std::fprintf(stderr, "\n");
            return 2;
        }
    }
    for (size_t i = 0; i < shapes.size(); i++)
        if (chosen[i]) bench(shapes[i]);
    return 0;
}
