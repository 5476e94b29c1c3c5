"""How many CPUs chexcy may use: one home for the count the thread and worker defaults start from."""
import os


def cores_available():
    """CPUs this process may run on (its affinity mask; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
