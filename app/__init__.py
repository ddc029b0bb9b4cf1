"""A webhook receiver for signed WhatsApp-style messages."""
