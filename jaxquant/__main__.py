"""``python -m jaxquant`` = the ``jaxquant`` command."""

import sys

from jaxquant import interrupt

interrupt.install()  # before the command's own imports: a Ctrl-C from here on ends with status 130
try:
    with interrupt.deferred():
        from jaxquant.cli import console_main
except KeyboardInterrupt:
    print("\nerror: interrupted (Ctrl-C) while starting; nothing was written.", file=sys.stderr)
    sys.exit(130)

console_main()
