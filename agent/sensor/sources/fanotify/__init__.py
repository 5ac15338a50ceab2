"""The fanotify source: :mod:`.abi` (kernel ABI and buffer parser), :mod:`.mounts`,
:mod:`.reader` (the read-ahead thread) and :mod:`.source`."""
