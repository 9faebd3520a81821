"""fewstep.models"""
