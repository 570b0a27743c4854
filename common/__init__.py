"""The bottom layer of lt-engine: the error family (errors) and atomic file writes (io).

Every other package (pipelines/, kernels/, engine/) may import it; it imports none of them.
"""
