// The judge's half of a C++ test run (test mode only), compiled and linked
// before the candidate's program.  It takes the per-run secret from the pipe
// named by the last argument in a .preinit_array entry, before any constructor
// of the candidate's runs, and keeps it in storage with internal linkage that
// no other translation unit can name.  `main` prints it only after the tests'
// own `main` (renamed rr_tests_main) has returned.
#include <cstdio>
#include <cstdlib>
#include <unistd.h>

int rr_tests_main();
void rr_flush_streams();

namespace {

char secret[128];  // zero-initialised: no constructor runs on it

void take_secret(int argc, char** argv, char**) {
    int fd = std::atoi(argv[argc - 1]);
    size_t used = 0;
    ssize_t got;
    while (used < sizeof secret - 1 && (got = read(fd, secret + used, sizeof secret - 1 - used)) > 0) {
        used += static_cast<size_t>(got);
    }
    close(fd);
    while (used > 0 && secret[used - 1] == '\n') secret[--used] = '\0';
}

__attribute__((section(".preinit_array"), used)) void (*const take_secret_first)(
    int, char**, char**) = take_secret;

}  // namespace

int main() {
    rr_tests_main();
    rr_flush_streams();
    std::printf("\n%s\n", secret);
    std::fflush(stdout);
    return 0;
}
