/* The Pod sandbox ("pause") process of the local node's sandbox image.
 *
 * It only has to exist: it holds the Pod's namespaces while the containers come and go. As PID 1
 * of the sandbox it reaps zombies, and it exits 0 on SIGTERM/SIGINT so that StopPodSandbox is
 * quick. Built with `gcc -static` into an image that has nothing else (see build-images.sh).
 */
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig) { (void)sig; _exit(0); }

static void on_child(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    static const char v[] = "beam-backfill pause 1\n";
    return write(STDOUT_FILENO, v, sizeof v - 1) == (ssize_t)(sizeof v - 1) ? 0 : 1;
  }
  struct sigaction stop = {0}, child = {0};
  stop.sa_handler = on_stop;
  child.sa_handler = on_child;
  child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigaction(SIGTERM, &stop, NULL);
  sigaction(SIGINT, &stop, NULL);
  sigaction(SIGCHLD, &child, NULL);
  for (;;) pause();
}
