"""fewstep.quant"""
