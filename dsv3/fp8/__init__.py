"""dsv3.fp8"""
