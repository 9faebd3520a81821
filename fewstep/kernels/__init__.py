"""fewstep.kernels"""
