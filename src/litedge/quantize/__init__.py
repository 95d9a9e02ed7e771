"""litedge.quantize"""
