"""Sentences to speak: templates per vocabulary domain, with slots filled from word lists.

Each template has a stable id (`<domain>-<nn>`), so a retraining set and its held-out set can be
drawn from disjoint templates (held-out sentences that share a template with training overstate a
retrain). Append new patterns at the end of a domain's list: ids are positions.

References are written the way Whisper's English normaliser and both TTS engines agree on:
integers as digits, money as "N dollars" (espeak reads "$5" as "dollar five"), no years, no clock
times, no digit strings.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Literal

import numpy as np

Domain = Literal["commands", "medical", "finance", "numbers", "general"]
TextPool = Literal["templates", "unseen", "broad"]
"""Where a clip's sentence comes from: the templates (slots filled), the sentences kept for
judging generalisation, or broad everyday text for training on a drift's acoustics."""
DOMAINS: tuple[Domain, ...] = ("commands", "medical", "finance", "numbers", "general")

SLOTS: dict[str, tuple[str, ...]] = {
    "name": (
        "Maria", "James", "Aisha", "Robert", "Chen", "Olivia", "Samuel", "Priya", "Daniel",
        "Fatima", "George", "Hannah", "Lucas", "Grace", "Omar", "Emily", "Victor", "Sophie",
        "Martin", "Julia", "Peter", "Laura", "Henry", "Nina", "Thomas", "Rachel", "Kevin", "Anna",
    ),
    "surname": (
        "Lopez", "Patel", "Smith", "Nguyen", "Brown", "Garcia", "Miller", "Wilson", "Taylor",
        "Anderson", "Thompson", "Walker", "Harris", "Clark", "Lewis", "Young", "Baker", "Turner",
    ),
    "drug": (
        "amoxicillin", "ibuprofen", "metformin", "lisinopril", "atorvastatin", "omeprazole",
        "insulin", "aspirin", "prednisone", "warfarin", "heparin", "morphine", "paracetamol",
        "albuterol", "furosemide", "ceftriaxone", "vancomycin", "gabapentin",
    ),
    "dose": ("5", "10", "20", "25", "40", "50", "100", "200", "250", "500", "750", "1000"),
    "unit": ("milligrams", "micrograms", "units", "milliliters"),
    "room": tuple(str(f * 100 + r) for f in (1, 2, 3, 4) for r in (2, 4, 7, 11, 15, 20)),
    "ward": ("cardiology", "oncology", "pediatrics", "the emergency department", "radiology",
             "the intensive care unit", "neurology", "maternity", "orthopedics"),
    "symptom": ("chest pain", "a fever", "shortness of breath", "a headache", "nausea",
                "dizziness", "back pain", "a rash", "a persistent cough", "swelling"),
    "test": ("a blood test", "an x-ray", "an MRI scan", "an ultrasound", "a urine sample",
             "a CT scan", "an ECG", "a biopsy"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "date": tuple(f"{m} {d}" for m in ("March", "June", "October", "December")
                  for d in ("1st", "3rd", "12th", "15th", "21st", "28th")),
    "amount": ("15", "45", "80", "120", "250", "600", "900", "1,250", "3,000", "4,500",
               "12,000", "75,000"),
    "account": ("checking", "savings", "business", "joint", "retirement", "credit card"),
    "company": ("Apple", "Microsoft", "Amazon", "Tesla", "Google", "Netflix", "Boeing",
                "Walmart", "Intel", "Disney"),
    "percent": ("2", "3", "5", "7", "10", "12", "15", "20", "25"),
    "count": tuple(str(n) for n in (2, 3, 4, 6, 8, 9, 12, 14, 16, 18, 24, 30, 40, 60, 75, 90)),
    "big": ("150", "320", "480", "700", "1,200", "2,500", "8,000", "15,000", "40,000",
            "250,000"),
    "item": ("boxes", "chairs", "laptops", "bottles of water", "pallets", "tickets", "crates",
             "printers", "bags of rice", "light bulbs"),
    "city": ("Boston", "Chicago", "Denver", "Seattle", "Houston", "Atlanta", "Phoenix",
             "Miami", "Portland", "Dallas", "London", "Toronto"),
    "device": ("the lights", "the television", "the fan", "the heater", "the radio",
               "the oven", "the dishwasher", "the air conditioner", "the alarm"),
    "place": ("the kitchen", "the living room", "the bedroom", "the garage", "the office",
              "the bathroom", "the hallway", "the basement"),
    "contact": ("my mother", "my brother", "the office", "the doctor", "my manager",
                "the school", "my neighbor", "the dentist"),
    "song": ("some jazz", "the news", "classical music", "my workout playlist", "a podcast",
             "some rock music", "the weather forecast", "an audiobook"),
    "minutes": ("5", "10", "15", "20", "30", "45", "90"),
    "food": ("pasta", "soup", "a sandwich", "pizza", "rice and beans", "a salad", "pancakes",
             "grilled fish", "chicken curry"),
    "animal": ("dog", "cat", "horse", "rabbit", "parrot", "goat", "fox", "owl"),
    "weather": ("sunny", "cold", "rainy", "windy", "cloudy", "warm", "foggy"),
    "activity": ("read a book", "go for a walk", "visit the museum", "cook dinner",
                 "watch a movie", "clean the house", "ride a bike", "plant some flowers"),
    "adjective": ("quiet", "busy", "beautiful", "crowded", "peaceful", "noisy", "small",
                  "large"),
}  # fmt: skip

_PATTERNS: dict[Domain, tuple[str, ...]] = {
    "commands": (
        "Turn off {device} in {place}.",
        "Please turn on {device} in {place}.",
        "Set a timer for {minutes} minutes.",
        "Call {contact} on {day}.",
        "Play {song} in {place}.",
        "Remind me to call {contact} in {minutes} minutes.",
        "Send a message to {name} saying I will be late.",
        "Add {food} to my shopping list.",
        "What is the weather like in {city} on {day}?",
        "Open the door to {place} and turn on {device}.",
        "Schedule a meeting with {name} {surname} on {day}.",
        "Navigate to the nearest station in {city}.",
    ),
    "medical": (
        "Give {name} {surname} {dose} {unit} of {drug}.",
        "The patient in room {room} reports {symptom}.",
        "Schedule a follow up for {name} {surname} on {day}.",
        "Order {test} for the patient in room {room}.",
        "Please move {name} {surname} to {ward}.",
        "Stop the {drug} and start {dose} {unit} of {drug2}.",
        "Doctor {surname} will see the patient in room {room} on {day}.",
        "{name} has been taking {drug} for {count} days.",
        "The nurse in {ward} needs {test} for {name} {surname}.",
        "Increase the {drug} to {dose} {unit} twice a day.",
        "The patient complains of {symptom} after taking {drug}.",
        "Discharge {name} {surname} from room {room} on {date}.",
    ),
    "finance": (
        "Transfer {amount} dollars from my {account} account to {name}.",
        "My {account} account balance is {amount} dollars.",
        "Buy {count} shares of {company} today.",
        "Sell my {company} stock if it drops {percent} percent.",
        "The invoice for {amount} dollars is due on {date}.",
        "Pay {name} {surname} {amount} dollars on {day}.",
        "The interest rate on the {account} account is {percent} percent.",
        "{company} shares rose {percent} percent on {day}.",
        "Please cancel the payment of {amount} dollars to {company}.",
        "Open a new {account} account for {name} {surname}.",
        "The quarterly report shows revenue of {big} dollars.",
        "Set aside {amount} dollars each month for savings.",
    ),
    "numbers": (
        "Order {count} {item} for the office in {city}.",
        "The warehouse in {city} has {big} {item} in stock.",
        "We need {count} {item} by {date}.",
        "There were {big} people at the concert in {city}.",
        "The package weighs {count} pounds and costs {amount} dollars.",
        "Room {room} has {count} chairs and {count2} tables.",
        "The train to {city} leaves in {minutes} minutes.",
        "The population of the town grew by {percent} percent to {big}.",
        "Add {count} and {count2} and tell me the total.",
        "The bus carries {count} passengers and {count2} bags.",
        "Deliver {count} {item} to room {room} on {day}.",
        "The distance to {city} is {big} miles.",
    ),
    "general": (
        "The {animal} slept in the garden all afternoon.",
        "I would like to {activity} on {day}.",
        "It was {weather} in {city} yesterday.",
        "{name} cooked {food} for the whole family.",
        "The streets of {city} were {adjective} this morning.",
        "My friend {name} wants to {activity} this weekend.",
        "We saw a {animal} near the river on {day}.",
        "The library in {city} is {adjective} and {adjective2}.",
        "After dinner we decided to {activity}.",
        "{name} {surname} moved to {city} last year.",
        "The weather will be {weather} and {weather2} on {day}.",
        "Let us have {food} and then {activity}.",
    ),
}

_UNSEEN_PATTERNS: dict[Domain, tuple[str, ...]] = {
    "medical": (
        "Her blood pressure dropped sharply during the night shift.",
        "Keep the wound dry and change the bandage every morning.",
        "The surgeon wants a second opinion before the operation.",
        "Check his oxygen level again in 15 minutes.",
        "She is allergic to penicillin and to shellfish.",
        "The lab results came back normal except for the iron level.",
        "Bring the wheelchair to the side entrance of the clinic.",
        "He has not eaten anything since the procedure.",
        "The child needs 2 more vaccinations before school starts.",
        "Ask the pharmacy whether the tablets can be crushed.",
        "Her heart rate stayed above 110 for most of the evening.",
        "The stitches can come out after 10 days.",
        "Please record every dose on the chart by the bed.",
        "The family would like to speak with the consultant tomorrow.",
        "His cough has improved but he still feels tired.",
        "Wash your hands before touching the drip line.",
        "The ambulance is bringing in 3 patients from the motorway crash.",
        "She should avoid lifting anything heavy for 6 weeks.",
        "The scan showed a small fracture in the left wrist.",
        "Monitor his temperature closely while the infection clears.",
        "The physiotherapist will visit the ward after lunch.",
        "Her sugar levels are much better since the diet changed.",
        "Send the tissue sample to the laboratory for analysis.",
        "He feels a sharp pain when he breathes in deeply.",
    ),
    "numbers": (
        "The stadium holds 52,000 fans on match days.",
        "Fold the paper 7 times and cut along the crease.",
        "A dozen eggs cost 4 dollars at the corner shop.",
        "The bridge is 870 meters long and 30 meters high.",
        "We planted 36 trees along the northern fence.",
        "The recipe needs 3 cups of flour and 2 spoons of sugar.",
        "Only 19 of the 25 students passed the final exam.",
        "The ship carried 1,800 containers across the ocean.",
        "Multiply 12 by 11 and subtract 9 from the result.",
        "The marathon route passes 14 bridges and 5 parks.",
        "Our team scored 87 points in the second half.",
        "The hotel has 240 rooms on 16 floors.",
        "Each bottle holds 750 milliliters of juice.",
        "The printer jammed after 63 pages.",
        "The farm produces 5,000 liters of milk every week.",
        "Divide the 48 cookies equally among 6 children.",
        "The elevator can carry at most 8 people.",
        "There are 365 steps to the top of the tower.",
        "The tank was refilled with 55 gallons of fuel.",
        "Her phone battery lasted 31 hours on one charge.",
        "The museum received 9,400 visitors over the holiday.",
        "Cut the rope into 4 pieces of equal length.",
        "The library lent out 1,150 books last month.",
        "The orchestra has 72 musicians and 1 conductor.",
    ),
    "general": (
        "The old clock in the hallway stopped ticking last winter.",
        "She painted the fence a bright shade of yellow.",
        "Nobody remembered to water the plants on the balcony.",
        "The children built a sandcastle near the pier.",
        "He always reads the newspaper before breakfast.",
        "A gentle breeze carried the smell of fresh bread.",
        "The neighbours are planning a party in the courtyard.",
        "My grandmother knits scarves for the whole village.",
        "The lake froze early and the ducks flew south.",
        "They missed the last ferry and slept at the harbour.",
        "The cat knocked a glass of milk off the table.",
        "We found an old map inside the wooden chest.",
    ),
    "finance": (
        "The bank approved the mortgage after a long review.",
        "Keep every receipt for the tax return.",
        "The budget for the new kitchen ran out quickly.",
        "Our pension fund lost value during the recession.",
        "He borrowed money from his brother to start the bakery.",
        "The auditors found a mistake in the spring accounts.",
        "Prices at the supermarket went up again this week.",
        "She negotiated a better salary before signing the contract.",
        "The shop only accepts cash on weekends.",
        "Exchange the remaining euros at the airport counter.",
        "The startup raised enough funding to hire 4 engineers.",
        "Our electricity bill doubled over the winter.",
    ),
    "commands": (
        "Turn down the heating in the bedroom.",
        "Read me the latest message from my sister.",
        "Lock the front door and switch off the porch light.",
        "Remind me to call the plumber after work.",
        "Skip this song and play something calmer.",
        "Open the curtains in the living room.",
        "Add washing powder to the shopping list.",
        "Start a timer for 25 minutes.",
        "Show me the photos from the beach trip.",
        "Pause the podcast until I get back.",
        "Increase the volume on the kitchen speaker.",
        "Cancel my alarm for tomorrow morning.",
    ),
}
"""Sentences written to judge generalisation: in no template above and sharing none's pattern,
never to be trained on (SynthSpec.text = "unseen"). Integers as digits, like the templates."""


_BROAD_SENTENCES: dict[Domain, tuple[str, ...]] = {
    "medical": (
        "The doctor listened to his chest and asked him to cough.",
        "Drink plenty of water and rest for a few days.",
        "The waiting room was full of parents with sick children.",
        "Her knee swelled up after the long walk down the hill.",
        "The dentist found 2 small holes in his back teeth.",
        "Take one tablet with food every morning and evening.",
        "The hospital opened a new wing for older patients.",
        "He twisted his ankle while running for the bus.",
        "The nurse wrapped a warm blanket around the old man.",
        "A fever usually breaks after a good night of sleep.",
        "The pharmacist explained how to use the inhaler.",
        "She wears glasses only when she reads small print.",
        "The clinic closes early on public holidays.",
        "Regular exercise lowers the risk of heart disease.",
        "The midwife visited the new mother twice that week.",
        "He needs crutches until the bone has healed.",
        "The cream should be rubbed gently into the skin.",
        "Too much salt is bad for your kidneys.",
        "The patient asked for a glass of cold water.",
        "Flu season usually starts when the weather turns cold.",
        "Her hearing has got worse over the last few years.",
        "The emergency doctor worked through the whole weekend.",
        "Wear a mask if you have a sore throat.",
        "The scanner is on the second floor.",
        "He felt dizzy after standing up too quickly.",
        "The ward sister keeps a list of every visitor.",
        "Babies need to be weighed at every check up.",
        "The bruise on her arm turned purple overnight.",
        "A healthy diet includes fruit and green vegetables.",
        "The optician said his eyes were perfectly fine.",
        "The old man takes his pills with a cup of tea.",
        "She could not sleep because of the noise in the corridor.",
        "The new vaccine is stored in a special fridge.",
        "His sore back kept him away from work for a week.",
        "The first aid kit is kept under the kitchen sink.",
        "Sunburn can be soothed with cool water and aloe.",
        "The hospital car park charges by the hour.",
        "He breathes more easily since he gave up smoking.",
        "The nurse measured the baby's head with a soft tape.",
        "Most colds clear up on their own within a week.",
    ),
    "numbers": (
        "The school has 14 classrooms and 2 small gyms.",
        "She ran 5 kilometers before the sun came up.",
        "The pizza was cut into 8 equal slices.",
        "Our flat is on the top floor of the tower.",
        "He counted 27 red cars on the way home.",
        "The garden is 20 meters wide and 45 meters long.",
        "Add 3 eggs and 200 grams of butter to the bowl.",
        "The concert hall has 1,200 seats.",
        "It takes 40 minutes to drive to the coast.",
        "The twins turned 9 last Saturday.",
        "The shop sold 320 umbrellas during the storm.",
        "There are 52 cards in a normal deck.",
        "The plane flew at 10,000 meters above the clouds.",
        "She has read 17 books since the summer.",
        "The bakery makes 600 loaves every night.",
        "Our street has 33 houses on each side.",
        "The jar holds 250 sweets of different colours.",
        "The river rose by 2 meters after the rain.",
        "He paid 15 dollars for a pair of socks.",
        "The class collected 4,000 bottle caps for the project.",
        "A week has 7 days and a year has 12 months.",
        "The parade lasted 3 hours and had 60 floats.",
        "The ladder reaches a height of 6 meters.",
        "We drove 450 miles in 2 days.",
        "The chess club meets with 18 members every Tuesday.",
        "Each box contains 24 pencils and 6 erasers.",
        "The coffee machine makes 90 cups a day.",
        "The test has 50 questions and lasts 1 hour.",
        "She saved 300 dollars for the new bicycle.",
        "The old tree is nearly 200 years old.",
        "The bus stops at 12 villages along the valley.",
        "Fill the bucket with 10 liters of warm water.",
        "The team won 21 games and lost only 4.",
        "The cinema shows 5 different films tonight.",
        "A spider has 8 legs and most insects have 6.",
        "The room needs 3 more lamps and 1 big rug.",
        "The road climbs 900 meters in 7 sharp bends.",
        "He answered 46 emails before lunch.",
        "The choir sang 13 songs in the church.",
        "The zoo has 2 elephants and 11 monkeys.",
    ),
    "general": (
        "The sun set behind the hills and the sky turned orange.",
        "My brother plays the guitar in a small band.",
        "We walked along the beach and collected shells.",
        "The train was late because of snow on the tracks.",
        "She forgot her umbrella at the cafe again.",
        "The museum has a famous painting of a sailing ship.",
        "Our dog barks at every bird in the garden.",
        "He fixed the broken chair with glue and a nail.",
        "The market sells fresh fish every Friday morning.",
        "They spent the holiday camping in the mountains.",
        "The teacher wrote the answer on the blackboard.",
        "I left my keys on the kitchen table.",
        "The wind blew the leaves across the empty road.",
        "My sister is learning to speak Japanese.",
        "The football match was cancelled because of the storm.",
        "We watched a film about whales last night.",
        "The baker puts seeds on top of every loaf.",
        "A tall man in a grey coat opened the gate.",
        "The village hall needs a new roof.",
        "The children laughed at the clown's big shoes.",
        "He drinks his coffee without milk or sugar.",
        "The bridge was painted red a few years ago.",
        "We could hear the sea from our bedroom window.",
        "The farmer drove his tractor into the muddy field.",
        "The bookshop on the corner closed last spring.",
        "She sang quietly while she washed the dishes.",
        "Please close the window before you go to bed.",
        "The boat drifted slowly towards the island.",
        "My uncle tells the same joke at every wedding.",
        "The park is full of people when the sun is out.",
        "A small bird built a nest above our front door.",
        "The students cheered when the exams were over.",
        "The candles flickered as the door opened.",
        "He repaired his bicycle in the garage.",
        "The fog was so thick that we could not see the road.",
        "Our neighbour grows tomatoes in his greenhouse.",
        "The kettle whistled on the stove.",
        "She wrote a long letter to her best friend.",
        "The photographs from the trip are on my laptop.",
        "The restaurant by the river serves excellent soup.",
    ),
    "finance": (
        "The shop offers a discount to students on Mondays.",
        "He keeps his savings in a box under the bed.",
        "The company hired a new manager for the sales team.",
        "Rent in the city centre has become very expensive.",
        "She paid for the groceries with her debit card.",
        "The cash machine outside the bank is broken.",
        "Our insurance covers damage from floods and fire.",
        "The accountant checks the books every quarter.",
        "He lost his wallet on the way to the station.",
        "The price of petrol fell slightly this month.",
        "They split the bill equally at the end of the meal.",
        "The factory cut costs by saving energy at night.",
        "Small businesses struggled during the long winter.",
        "She asked the bank for a loan to buy a van.",
        "The market stall only takes coins and notes.",
        "The new tax rules start at the beginning of April.",
        "He compared the prices of 3 different phones.",
        "The shareholders met to discuss the annual results.",
        "Tickets for the show are cheaper if you book early.",
        "The landlord raised the rent without any warning.",
        "Our family keeps a budget for food and heating.",
        "The coins in the fountain are given to charity.",
        "She earns extra money by teaching piano at weekends.",
        "The bank sends a statement at the end of every month.",
        "The shop refunded the money for the broken toaster.",
        "Investors were nervous after the sudden drop in prices.",
        "He saves a little money from every pay cheque.",
        "The charity raised enough to build a new well.",
        "The restaurant added a service charge to the bill.",
        "Credit card fees can add up very quickly.",
        "The shop assistant counted the change twice.",
        "The bakery doubled its profits after it moved.",
        "We are saving up for a holiday by the sea.",
        "The bank manager explained the new savings plan.",
        "The old coins turned out to be worth a lot.",
        "She checks her account on her phone every evening.",
        "The council spends most of its money on schools.",
        "The company pays its workers on the last Friday.",
        "He sold his old car to a neighbour.",
        "Prices usually go up just before the holidays.",
    ),
    "commands": (
        "Turn on the lights in the hallway.",
        "Ring my mother and put her on speaker.",
        "Some quiet music in the kitchen would be nice.",
        "Tell me how long it takes to walk to the park.",
        "Set the oven to 180 degrees.",
        "Send a message to the team that I am running late.",
        "Find a good Italian restaurant near the station.",
        "Wake me up early tomorrow morning.",
        "Turn the television off in 30 minutes.",
        "What is the weather like at the seaside today.",
        "Put bread and milk on my shopping list.",
        "Close the garage door and turn on the alarm.",
        "Read the news headlines out loud.",
        "Play the next episode of my favourite show.",
        "Find my phone and make it ring.",
        "Book a taxi to the airport for early tomorrow.",
        "Translate good morning into Spanish.",
        "Dim the lights in the dining room.",
        "Remind me to water the plants on Sunday.",
        "Show me the way to the nearest petrol station.",
        "Turn up the fan in the bedroom.",
        "Write down that the meeting moved to Thursday.",
        "Stop the music and turn on the radio.",
        "Tell me a short story about a dragon.",
        "Order more coffee beans from the usual shop.",
        "Check if the back door is locked.",
        "Set the thermostat to 21 degrees.",
        "Take a photo when everyone is ready.",
        "Play the sound of rain for 1 hour.",
        "Call the office and say I am ill today.",
        "Switch the washing machine to a cold wash.",
        "Find the recipe for banana bread.",
        "Switch every light in the house off.",
        "Read my calendar for next week.",
        "Call the vet and book a check up for the dog.",
        "Repeat the last thing you said.",
        "Share my location with my brother.",
        "Open the garage and switch on the outside lights.",
        "Mute the speaker in the living room.",
        "Tell me when the next train leaves for the city.",
    ),
}
"""Broad everyday text, sharing no sentence or pattern with the templates or the unseen
sentences: what a retrain speaks in a drift's acoustics so that it learns the acoustics, not a
sentence shape (SynthSpec.text="broad")."""


@dataclass(frozen=True)
class Template:
    id: str
    domain: Domain
    pattern: str

    @property
    def slots(self) -> list[str]:
        """Slot names in order; a trailing digit (`drug2`) draws a different word of `drug`."""
        return [f for _, f, _, _ in string.Formatter().parse(self.pattern) if f]

    @property
    def variants(self) -> int:
        """How many distinct sentences this template can make."""
        total, used = 1, {}
        for slot in self.slots:
            base = slot.rstrip("0123456789")
            total *= len(SLOTS[base]) - used.get(base, 0)
            used[base] = used.get(base, 0) + 1
        return total

    def render(self, rng: np.random.Generator) -> str:
        values, taken = {}, {}
        for slot in self.slots:
            base = slot.rstrip("0123456789")
            words = [w for w in SLOTS[base] if w not in taken.get(base, ())]
            values[slot] = words[int(rng.integers(len(words)))]
            taken.setdefault(base, set()).add(values[slot])
        text = self.pattern.format(**values)
        return text[0].upper() + text[1:]


TEMPLATES: dict[str, Template] = {
    f"{domain}-{k:02d}": Template(f"{domain}-{k:02d}", domain, pattern)
    for domain, patterns in _PATTERNS.items()
    for k, pattern in enumerate(patterns, 1)
}
UNSEEN: dict[str, Template] = {
    f"{domain}-unseen-{k:02d}": Template(f"{domain}-unseen-{k:02d}", domain, sentence)
    for domain, sentences in _UNSEEN_PATTERNS.items()
    for k, sentence in enumerate(sentences, 1)
}
"""The unseen sentences as one-sentence templates (no slots), each its own group."""
BROAD: dict[str, Template] = {
    f"{domain}-broad-{k:02d}": Template(f"{domain}-broad-{k:02d}", domain, sentence)
    for domain, sentences in _BROAD_SENTENCES.items()
    for k, sentence in enumerate(sentences, 1)
}
"""The broad sentences as one-sentence templates, each its own group."""
POOLS: dict[TextPool, dict[str, Template]] = {"templates": TEMPLATES, "unseen": UNSEEN, "broad": BROAD}


def templates_for(domain: Domain, template_ids: list[str] | None = None,
                  pool: TextPool = "templates") -> list[Template]:
    return [
        t
        for t in POOLS[pool].values()
        if t.domain == domain and (template_ids is None or t.id in template_ids)
    ]


def sentence_count(domain: Domain) -> int:
    """Distinct sentences a domain can make (templates never produce the same sentence)."""
    return sum(t.variants for t in templates_for(domain))


def split_templates(test_fraction: float = 0.25, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train ids, test ids): disjoint, every domain on both sides, the same for the same seed.
    Pass each as `SynthSpec.template_ids` so a held-out set shares no template with training."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for domain in DOMAINS:
        ids = [t.id for t in templates_for(domain)]
        order = rng.permutation(len(ids))
        k = min(len(ids) - 1, max(1, math.ceil(test_fraction * len(ids))))
        test += sorted(ids[i] for i in order[:k])
        train += sorted(ids[i] for i in order[k:])
    return train, test


def shared_templates(rows_a: list[dict], rows_b: list[dict]) -> set[str]:
    """Template ids that occur in both manifests' rows (empty when they are disjoint)."""
    return {r["template"] for r in rows_a} & {r["template"] for r in rows_b}
