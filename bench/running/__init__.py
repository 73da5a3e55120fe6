"""From a plan to rows: the sweep's options and points, the executors, the child launcher, the
runner and the results store."""
