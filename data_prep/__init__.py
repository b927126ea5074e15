"""`s3rec-prep`: raw data -> the sharded HDF5 dataset format of s3rec/data/format.py.

cli.py (verbs) -> release.py / amazon.py / synthetic.py (a Source yielding blocks of users)
-> writer.py (shards on every MPI rank, manifest last, all-or-nothing) ; verify.py ; negatives.py
(the release rule for the 99 evaluation negatives, seeded per block of users); mpi.py (ranks);
fixtures.py (small input files in the real formats, for tests).
"""
