"""A team's servers: the tracking server, pushing local work to it, reproducing and promoting a run,
and `alexnet gc`."""
