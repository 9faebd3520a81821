"""fewstep.export"""
