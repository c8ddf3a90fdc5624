"""dsv3.parallel"""
