"""The graph passes between autodiff and codegen: algebraic simplification, specialization,
fusion of elementwise chains into kernels, and the schedule with its buffer storage plan."""

from .pipeline import RULES, Buffer, Kernel, Rule, Schedule, Storage, fuse_elementwise, schedule, simplify, specialize

__all__ = ["RULES", "Buffer", "Kernel", "Rule", "Schedule", "Storage", "fuse_elementwise", "schedule", "simplify",
           "specialize"]
