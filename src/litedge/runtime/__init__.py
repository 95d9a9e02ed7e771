"""litedge.runtime"""
