"""Membrane's telephony edge: Twilio PSTN calls, webhooks, agents on mobile, the audio bridge."""
