"""The MQTT transport: session, link, topics, requests, replies, Home Assistant discovery."""
