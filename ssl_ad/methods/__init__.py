"""ssl_ad.methods"""
