"""Rank discovery for `mpirun -np K s3rec-prep ...`; a plain run is one rank.

mpi4py is imported only when an MPI launcher started us (its variables are set), so a plain run
never loads an MPI library."""
from __future__ import annotations

import os

LAUNCHER_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


class Serial:
    rank, size = 0, 1

    def barrier(self) -> None:
        pass

    def allgather(self, obj):
        return [obj]

    def bcast(self, obj, root: int = 0):
        return obj


class MPIComm:
    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def barrier(self) -> None:
        self.comm.Barrier()

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)


def world():
    if not any(v in os.environ for v in LAUNCHER_VARS):
        return Serial()
    from mpi4py import MPI
    comm = MPIComm(MPI.COMM_WORLD)
    return comm if comm.size > 1 else Serial()
