/* The CRI sandbox ("pause") process of ms2m's CRI tests: holds the pod's
 * namespaces, reaps orphans, exits 0 on SIGTERM or SIGINT. Built static by
 * hack/cri-setup.sh into the sandbox image (no registry to pull one from). */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction q = {.sa_handler = quit};
    struct sigaction r = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    sigaction(SIGTERM, &q, NULL);
    sigaction(SIGINT, &q, NULL);
    sigaction(SIGCHLD, &r, NULL);
    for (;;)
        pause();
}
