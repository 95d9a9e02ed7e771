"""litedge.profile"""
