"""mf_longseq: context parallelism (ring, Ulysses, hybrid) for long-sequence training with MindFormers.

Importing the package needs no device and no communication; the MindFormers registrations happen in
``mf_longseq.registry`` when MindFormers is importable.
"""
__version__ = "0.1.0"
