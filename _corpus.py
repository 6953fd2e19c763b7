"""Embedded text for ``xpopt validate``: no download, the same bytes everywhere.

Original prose written for this project (public domain / CC0); about five
kilobytes, enough for a character-level model to learn common words and
spacing in a few hundred steps.
"""

TEXT = """\
The lighthouse keeper kept two notebooks. In the first he wrote the weather: \
the wind at dawn, the height of the swell, the colour of the sky before the \
rain. In the second he wrote what he had learned, and that book was much \
thinner, because most days he learned nothing that he could put into words.

He had come to the island in the spring of a wet year. The boat that brought \
him also brought flour, lamp oil, a crate of apples and a box of letters for \
the man he was replacing. That man had already gone, so the letters stayed on \
a shelf by the door, and every evening the new keeper looked at them and \
decided, again, not to read them.

The lamp needed care. Each afternoon he climbed the hundred and twelve steps, \
cleaned the glass, trimmed the wick and wound the clockwork that turned the \
lens. The lens was older than the tower. It had been made by patient people \
who ground each ring of glass by hand, and when the light passed through it \
the beam went out across the water as straight as a ruled line. Ships far \
away saw it and knew where the rocks were. He liked to think of them, the \
sailors he would never meet, counting the flashes and turning a little to \
the north.

In the summer the days were long and the work was light. He mended the roof \
of the store, painted the railings and walked the whole shore of the island \
in an hour. He found a small cove where seals slept on the warm stones, and \
he learned to sit still enough that they stopped watching him. He planted \
beans behind the wall where the wind could not reach them, and some of them \
grew. He baked bread twice a week and ate it with salt fish and the last of \
the apples.

In the autumn the storms came. Some nights the wind was so strong that the \
tower hummed like a struck bell, and spray reached the gallery, a hundred \
feet above the sea. On those nights he did not sleep. He sat by the lamp, \
listened to the clockwork, and wrote in the first notebook every hour: wind \
from the west, rising; rain heavy; sea very rough; light burning well. The \
words were the same each time, and writing them was a way of keeping watch.

Once, in the middle of such a night, the clockwork stopped. He heard the \
silence before he understood it. The lens hung still and the beam pointed at \
one patch of dark water, which meant that to every ship outside that patch \
the light had gone out. He found the broken spring by the light of a candle, \
and while he worked on it he turned the lens by hand, walking around and \
around the lamp, counting the seconds between flashes so that the pattern \
would stay true. He walked until the morning. When the supply boat came the \
next week he asked for a new spring and a second one to keep, and he wrote \
in the thinner notebook: the machine is a promise that someone keeps, and \
when it breaks the promise is still yours.

Winter was quiet. Snow settled on the rocks and melted by noon. The seals \
left and the birds came, thousands of them, and the island was loud with \
them from dawn to dusk. He counted them for a scientist on the mainland who \
sent him a letter each month with a list of questions, and he answered the \
questions as carefully as he could, even when the answer was that he did not \
know.

Near the end of the winter he opened the box of letters at last. They were \
not secrets. They were from the old keeper's sister, who wrote about her \
garden, her neighbours and the price of coal, and who asked in every letter \
whether he was eating properly and whether the lamp was still burning. He \
wrote to her and told her that her brother had gone to the mainland, that \
the lamp was burning, and that he was eating well. She wrote back in the \
spring and sent him seeds.

He stayed on the island for eleven years. When he left he gave the new \
keeper both notebooks. The first was full, twenty volumes of wind and rain. \
The second had grown to forty pages, and the last thing written in it was \
this: do the small work every day, write down what you see, and keep the \
light turning even when you have to turn it by hand.
"""
