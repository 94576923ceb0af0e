"""A worker's keyed processes: forked (from the zygote or directly), fed through their pipes,
watched until they exit.
"""
