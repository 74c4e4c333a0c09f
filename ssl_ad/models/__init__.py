"""ssl_ad.models"""
