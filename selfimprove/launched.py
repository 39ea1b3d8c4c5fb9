"""The entry point of the processes a multi-process training stage starts (training/launch.py):
``accelerate launch`` itself (first argument ``accelerate``) and each worker it starts. Ctrl-C
reaches them too, often while they still import torch: they leave quietly with exit 130, and the
pipeline process says "interrupted" in one line. Hence the handler is set here, before anything
heavy is imported, and the launcher's agent does not log each worker's shutdown."""

import logging
import signal
import sys


def leave(*_) -> None:
    sys.exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, leave)
    if sys.argv[1:2] == ["accelerate"]:
        sys.argv = ["accelerate launch", *sys.argv[2:]]
        logging.disable(logging.WARNING)
        from accelerate.commands.launch import main
    else:
        from selfimprove.training.launch import main
    main()
