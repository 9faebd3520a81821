"""fewstep.engine"""
