"""The maths: the low-rank layer type, the exact decomposition engine, truncation to new factors in the save dtype,
the window schedule, the parallel map and the merge methods. Imports only numpy, torch, the errors and the
registry type."""
