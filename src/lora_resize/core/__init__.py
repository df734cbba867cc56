"""The maths: the low-rank layer type, the exact decomposition engine, truncation to new factors in the save dtype,
the window schedule and the parallel map. Imports only numpy, torch and the errors."""
