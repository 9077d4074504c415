/* The container of the churn benchmark: takes the name TOKEN (its comm, so the
 * benchmark can tell which container a denial came from without asking gputrace),
 * opens PATH once as GPU user space does, prints "TOKEN errno=E" and exits.
 *
 *   open_once TOKEN PATH
 *
 * Built static: the container's root filesystem holds nothing else. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: open_once TOKEN PATH\n");
        return 2;
    }
    prctl(PR_SET_NAME, argv[1], 0, 0, 0);
    int fd = open(argv[2], O_RDWR | O_CLOEXEC | O_NOCTTY);
    printf("%s errno=%d\n", argv[1], fd < 0 ? errno : 0);
    return 0;
}
