"""Built-in text for measuring what quantization costs, so nothing is downloaded.

Two different passages: one to calibrate per-layer sensitivity (`--target-bpw`), one held out to
evaluate the result. Each mixes the kinds of text local models are asked about: prose, dialogue,
instructions, code, numbers and lists.
"""

CALIBRATION = """\
The river rose slowly through the night, and by morning the lower road was under water. \
Farmers moved their animals to the hill behind the church, where the ground stayed dry. \
Nobody in the village could remember a flood this early in the spring.

User: Can you summarise the meeting notes in three bullet points?
Assistant: Sure. 1) The launch moves to the second week of June. 2) Marketing needs the final \
screenshots by Friday. 3) Support will run two training sessions before release.

To reset the router, hold the power button for ten seconds until the light blinks orange, then \
wait two minutes before you connect again. If the problem continues, write down the error code \
and contact your provider.

def moving_average(values, window):
    total = sum(values[:window])
    result = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        result.append(total / window)
    return result

Invoice 2024-117: 3 chairs at 45.00 each, 1 desk at 210.50, shipping 18.75, total 363.25. \
Payment is due within 30 days. Late payments accrue interest at 1.5% per month.

Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The light reactions \
happen in the thylakoid membranes; the Calvin cycle then fixes carbon in the stroma. Plants in \
hot, dry climates often use C4 or CAM pathways to lose less water.

Review: The hotel was clean and the staff friendly, but the walls were thin and the breakfast \
ended far too early. Three stars out of five; I would stay again only for the location.

SELECT customer_id, COUNT(*) AS orders, SUM(amount) AS spent
FROM orders WHERE created_at >= '2024-01-01'
GROUP BY customer_id ORDER BY spent DESC LIMIT 10;

Translate into French: "The library opens at nine and closes at six on weekdays." \
La bibliothèque ouvre à neuf heures et ferme à dix-huit heures en semaine.

Shopping list: eggs, flour, two lemons, butter, a bag of rice, tomatoes, fresh basil, olive oil, \
dish soap and batteries for the kitchen clock.
"""

EVALUATION = """\
When the last train left the station, the platform fell silent except for a pigeon searching \
for crumbs under the benches. Maria pulled her coat tighter and checked the timetable again: \
the next departure was not until six in the morning.

User: What is the difference between a list and a tuple in Python?
Assistant: A list is mutable, so you can add, remove or change its items; a tuple is immutable \
once created. Tuples can be used as dictionary keys, and they signal that the data should not \
change.

Before you start, preheat the oven to 180 degrees. Mix the butter and sugar until pale, beat in \
the eggs one at a time, then fold in the flour and a pinch of salt. Bake for 25 minutes or until \
a skewer comes out clean.

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

The quarterly report shows revenue of 4.2 million, up 12% from last year, while costs grew 7%. \
Operating margin improved to 18.4%, and the company expects to hire 40 engineers in the next \
two quarters.

The heart pumps blood through two circuits: the pulmonary circuit carries it to the lungs to \
pick up oxygen, and the systemic circuit delivers that oxygen to the rest of the body. A resting \
adult heart beats about 60 to 100 times per minute.

Ticket #4821: The mobile app crashes when I upload a photo larger than 10 MB. Steps: open the \
gallery, choose a large image, tap upload. Expected: a progress bar. Actual: the app closes.

for name in sorted(scores, key=scores.get, reverse=True)[:3]:
    print(f"{name}: {scores[name]:.1f}")

Traduire en anglais : « Il pleut depuis trois jours et la rivière commence à déborder. » \
It has been raining for three days and the river is starting to overflow.

Packing list for the trip: passport, charger, two shirts, rain jacket, walking shoes, \
sunscreen, a paperback novel and the hotel booking confirmation.
"""
