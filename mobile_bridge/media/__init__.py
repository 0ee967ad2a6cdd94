"""The audio bridge's media: browser WebRTC (aiortc) to and from a phone's Media Stream."""
