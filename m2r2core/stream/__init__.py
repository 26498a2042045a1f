"""The accelerated residual stream: accelerator adapters over the frozen blocks, its walks
over the slow KV cache, and the tuned lens (the slow stream's learned readout).
"""
